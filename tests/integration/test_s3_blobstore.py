"""The S3 blob store against a real S3 server (moto, over HTTP; no client mocked), and
the pipeline across "hosts" that share nothing but Kafka and the bucket.

One moto server for the module, checking signatures and rights (`enforce_auth`), so
wrong credentials are refused as AWS would refuse them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from bench.harness import S3Server, s3_server
from captionstream.broker import free_port
from captionstream.errors import BlobNotFound, BlobStoreUnavailable, ConfigurationError
from captionstream.ingest.s3_blobstore import LAST_USED, S3BlobStore
from captionstream.schemas.events import decode_job_state
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.stack import (
    Stack,
    all_succeed,
    metric_samples,
    own_stack,
    read_topic,
    serving,
    sigkill_mid_batch,
    submit_images,
    wait_for_one_generation,
    wait_until,
)

BUCKET = "blobs"
PREFIX = "captionstream/images"
# A refused or unreachable store must be reported within this (not hang on retries).
QUICK_S = 5.0


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, dict[str, str]]]:
    root = tmp_path_factory.mktemp("s3-blobstore")
    with s3_server(root / "moto.log", bucket=BUCKET) as server:
        yield server, server.enforce_auth()


@pytest.fixture
def aws_env(
    s3: tuple[S3Server, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, str]:
    """The moto key in the environment, and nothing else botocore could find."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in s3[1].items():
        monkeypatch.setenv(name, value)
    return s3[1]


@pytest.fixture
def store(s3: tuple[S3Server, dict[str, str]], aws_env: dict[str, str]) -> Iterator[S3BlobStore]:
    blobs = S3BlobStore(BUCKET, PREFIX, endpoint_url=s3[0].endpoint, region="us-east-1")
    yield blobs
    blobs.close()


@pytest.fixture
def raw(s3: tuple[S3Server, dict[str, str]], aws_env: dict[str, str]) -> Any:
    """A plain boto3 client on the same bucket, to look behind the store's back."""
    return boto3.client("s3", endpoint_url=s3[0].endpoint, region_name="us-east-1")


def image(tag: str, size: int = 200_000) -> tuple[bytes, str]:
    data = tag.encode() + os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


def keys(raw: Any, prefix: str = PREFIX) -> list[str]:
    listing = raw.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


async def test_put_get_round_trip(store: S3BlobStore, raw: Any) -> None:
    data, sha = image("round-trip")
    ref = await store.put(data, sha, ".png")
    assert ref == f"s3://{BUCKET}/{PREFIX}/{sha[:2]}/{sha}.png"
    assert await store.get(ref) == data
    assert store.get_sync(ref) == data  # the inference thread's way
    head = raw.head_object(Bucket=BUCKET, Key=store.key_of(ref))
    assert head["ContentType"] == "image/png"
    assert abs(float(head["Metadata"][LAST_USED]) - time.time()) < 60


async def test_put_again_is_idempotent_and_refreshes_last_use(store: S3BlobStore, raw: Any) -> None:
    data, sha = image("idempotent", 1000)
    first = await store.put(data, sha, ".jpg")
    used = store.last_used(first)
    await asyncio.sleep(0.05)
    second = await store.put(data, sha, ".jpg")
    assert second == first
    refreshed = store.last_used(first)
    assert used is not None
    assert refreshed is not None
    assert refreshed > used
    assert [k for k in keys(raw) if sha in k] == [store.key_of(first)]
    head = raw.head_object(Bucket=BUCKET, Key=store.key_of(first))
    assert head["ContentType"] == "image/jpeg"  # the in-place copy kept it
    assert await store.get(first) == data


async def test_delete_if_idle_keeps_an_image_a_newer_job_stored(store: S3BlobStore) -> None:
    data, sha = image("ttl", 1000)
    ref = await store.put(data, sha, ".png")
    await asyncio.sleep(1.0)
    await store.put(data, sha, ".png")  # a second job with the same image
    # The first job's TTL (0.8 s) is over, but the second job used the image just now.
    assert not await asyncio.to_thread(store.delete_if_idle_sync, ref, 0.8)
    assert store.get_sync(ref) == data
    await asyncio.sleep(0.9)
    assert await asyncio.to_thread(store.delete_if_idle_sync, ref, 0.8)
    with pytest.raises(BlobNotFound):
        store.get_sync(ref)
    assert not store.delete_if_idle_sync(ref, 0)  # already gone: nothing to do


def test_delete_if_idle_without_metadata_uses_the_modification_time(
    store: S3BlobStore, raw: Any
) -> None:
    data, sha = image("no-metadata", 100)
    key = f"{PREFIX}/{sha[:2]}/{sha}.gif"
    raw.put_object(Bucket=BUCKET, Key=key, Body=data)  # stored by some other tool
    ref = f"s3://{BUCKET}/{key}"
    assert not store.delete_if_idle_sync(ref, 3600)
    assert store.delete_if_idle_sync(ref, 0)
    assert key not in keys(raw)


async def test_delete(store: S3BlobStore, raw: Any) -> None:
    data, sha = image("delete", 100)
    ref = await store.put(data, sha, ".webp")
    await store.delete(ref)
    assert store.key_of(ref) not in keys(raw)
    await store.delete(ref)  # idempotent


async def test_missing_object_is_blob_not_found(store: S3BlobStore) -> None:
    ref = f"s3://{BUCKET}/{PREFIX}/00/{'0' * 64}.png"
    with pytest.raises(BlobNotFound) as info:
        await store.get(ref)
    assert not info.value.retriable
    assert info.value.http_status == 404
    assert ref in info.value.detail
    with pytest.raises(BlobNotFound):
        store.get_sync(ref)
    assert store.last_used(ref) is None


async def test_forged_ref_to_an_existing_object_is_refused(store: S3BlobStore, raw: Any) -> None:
    data, sha = image("secret", 100)
    for key in (f"private/{sha[:2]}/{sha}.png", f"{PREFIX}/notes.txt"):
        raw.put_object(Bucket=BUCKET, Key=key, Body=data)
        for ref in (f"s3://{BUCKET}/{key}", f"s3://{BUCKET}/{PREFIX}/../{key}"):
            with pytest.raises(BlobNotFound):
                await store.get(ref)
            with pytest.raises(BlobNotFound):
                store.delete_if_idle_sync(ref, 0)
        assert key in keys(raw, prefix=key)  # untouched


def test_check_passes(store: S3BlobStore) -> None:
    store.check()


def assert_quick_configuration_error(blobs: S3BlobStore, *expected: str) -> str:
    start = time.monotonic()
    try:
        with pytest.raises(ConfigurationError) as info:
            blobs.check()
    finally:
        blobs.close()
    assert time.monotonic() - start < QUICK_S
    for text in expected:
        assert text in info.value.detail
    return info.value.detail


def test_missing_bucket_is_a_configuration_error(
    s3: tuple[S3Server, dict[str, str]], aws_env: dict[str, str]
) -> None:
    blobs = S3BlobStore("no-such-bucket", endpoint_url=s3[0].endpoint, region="us-east-1")
    detail = assert_quick_configuration_error(
        blobs, "'no-such-bucket' does not exist", s3[0].endpoint, "CAPTIONSTREAM_BLOB_STORE"
    )
    assert "s3://no-such-bucket" in detail


def test_wrong_credentials_are_a_configuration_error(
    s3: tuple[S3Server, dict[str, str]], aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    blobs = S3BlobStore(BUCKET, PREFIX, endpoint_url=s3[0].endpoint, region="us-east-1")
    assert_quick_configuration_error(
        blobs, f"'{BUCKET}'", "denied", "AWS_ACCESS_KEY_ID", s3[0].endpoint
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    blobs = S3BlobStore(BUCKET, PREFIX, endpoint_url=s3[0].endpoint, region="us-east-1")
    assert_quick_configuration_error(blobs, "denied")


def test_no_credentials_are_a_configuration_error(
    s3: tuple[S3Server, dict[str, str]], aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    blobs = S3BlobStore(BUCKET, PREFIX, endpoint_url=s3[0].endpoint, region="us-east-1")
    assert_quick_configuration_error(blobs, "no AWS credentials", "AWS_ACCESS_KEY_ID")


def test_unreachable_endpoint_is_a_configuration_error(aws_env: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    blobs = S3BlobStore(BUCKET, PREFIX, endpoint_url=endpoint, region="us-east-1")
    assert_quick_configuration_error(blobs, "cannot reach", endpoint, f"s3://{BUCKET}/{PREFIX}")


def test_store_down_later_is_retriable(aws_env: dict[str, str]) -> None:
    """After start-up, a store that stops answering fails the one request, retriably (the
    worker retries the job; the gateway answers 503), after botocore's few retries."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    blobs = S3BlobStore(BUCKET, PREFIX, endpoint_url=endpoint, region="us-east-1")
    data, sha = image("down", 100)
    start = time.monotonic()
    try:
        with pytest.raises(BlobStoreUnavailable) as info:
            blobs.put_sync(data, sha, ".png")
        with pytest.raises(BlobStoreUnavailable):
            blobs.get_sync(f"s3://{BUCKET}/{PREFIX}/{sha[:2]}/{sha}.png")
    finally:
        blobs.close()
    assert info.value.retriable
    assert info.value.http_status == 503
    assert endpoint in info.value.detail
    assert time.monotonic() - start < 2 * 10  # two requests, each a few quick attempts


async def test_pipeline_across_hosts_shares_only_kafka_and_the_bucket(
    s3: tuple[S3Server, dict[str, str]],
    aws_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    raw: Any,
) -> None:
    """A gateway, two workers and a bulk ingest run, each with a data directory of its
    own (as on four hosts), images in s3://. Jobs come by upload, by URL and by bulk
    ingest; one worker is SIGKILLed in the middle of a batch. Every job ends SUCCESS, the
    survivor read the dead worker's images from the bucket, and no image was stored on
    any host's disk. Prints the measured S3 read cost per batch."""
    root = tmp_path_factory.mktemp("hosts")
    hosts = {
        name: root / name
        for name in ("gateway-host", "worker-host-a", "worker-host-b", "ingest-host")
    }
    prefix = "pipeline"
    www = root / "www"
    www.mkdir()
    for i in range(2):
        (www / f"remote-{i}.png").write_bytes(make_png(40 + i, 30, color=(7, i, 77)))
    bulk, out = root / "bulk", root / "captions.jsonl"
    bulk.mkdir()
    for i in range(4):
        (bulk / f"b{i}.png").write_bytes(make_png(30 + i, 40, color=(8, i, 88)))
    with (
        serving(www) as base,
        own_stack(
            root,
            CAPTIONSTREAM_BLOB_STORE=f"s3://{BUCKET}/{prefix}",
            CAPTIONSTREAM_S3_ENDPOINT_URL=s3[0].endpoint,
            CAPTIONSTREAM_S3_REGION="us-east-1",
            # A captioner that takes its time, so the kill lands in a batch.
            CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create_slow",
            CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE="0.05",
            CAPTIONSTREAM_MAX_BATCH_SIZE="8",
            **aws_env,
        ) as stack,
    ):
        doomed, survivor = (
            stack.start_worker(CAPTIONSTREAM_DATA_DIR=str(hosts["worker-host-a"])),
            stack.start_worker(CAPTIONSTREAM_DATA_DIR=str(hosts["worker-host-b"])),
        )
        wait_for_one_generation(doomed, survivor, timeout_s=60)
        gateway = stack.start_gateway(
            CAPTIONSTREAM_DATA_DIR=str(hosts["gateway-host"]),
            CAPTIONSTREAM_FETCH_ALLOW_HOSTS="127.0.0.1",
        )
        by_url = []
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            for i in range(2):
                response = await client.post(
                    "/api/v1/jobs", json={"image_url": f"{base}/remote-{i}.png"}
                )
                assert response.status_code == 202, response.text
                by_url.append(str(response.json()["job_id"]))
        submitting = asyncio.create_task(submit_images(gateway, 40))
        await sigkill_mid_batch(stack, doomed, data_dir=hosts["worker-host-a"])
        job_ids = [*await submitting, *by_url]
        ingest = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "captionstream",
                "ingest",
                str(bulk),
                "--out",
                str(out),
            ],
            env=stack.env(CAPTIONSTREAM_DATA_DIR=str(hosts["ingest-host"])),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ingest.returncode == 0, ingest.stderr[-3000:]
        assert out.exists(), ingest.stderr[-3000:]
        ingested = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["status"] for line in ingested] == ["SUCCESS"] * 4
        await all_succeed(gateway, job_ids, timeout_s=120)
        assert survivor.alive()
        assert survivor.url is not None
        found = metric_samples(survivor.url)
        reads = found[("captionstream_processor_blob_read_seconds_count", ())]
        read_s = found[("captionstream_processor_blob_read_seconds_sum", ())]
        batches = found[("captionstream_processor_batch_size_count", ())]
        images = found[("captionstream_processor_batch_size_sum", ())]
        states = [
            decode_job_state(value)
            for _, value in await read_topic(stack.bootstrap, TOPICS.job_state.name)
        ]
    assert reads >= images > 0, "every image the survivor captioned, it read from the bucket"
    per_image_ms = 1000 * read_s / reads
    print(
        f"S3 reads in a worker (moto on this host): {reads:.0f} GETs, {per_image_ms:.1f} ms "
        f"each on average; {images / batches:.1f} images a batch, so "
        f"{per_image_ms * images / batches:.0f} ms of S3 reads per batch"
    )
    all_ids = {*job_ids, *(line["job_id"] for line in ingested)}
    refs = {state.image_ref for state in states if state.job_id in all_ids}
    assert len(refs) == len(all_ids) == 46
    assert all(str(ref).startswith(f"s3://{BUCKET}/{prefix}/") for ref in refs)
    assert len(keys(raw, prefix=prefix)) == 46
    for host in hosts.values():
        assert not [p for p in (host / "blobs").rglob("*") if p.is_file()]


def test_an_expired_jobs_image_leaves_the_bucket(
    s3: tuple[S3Server, dict[str, str]],
    aws_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    raw: Any,
) -> None:
    """The janitor's TTL deletion on the S3 store, through the pipeline: once a finished
    job expires, its state is gone and so is its object (found by last use in the
    object's metadata, not by a file's mtime)."""
    prefix = "expiry"
    with own_stack(
        tmp_path_factory.mktemp("ttl-s3"),
        CAPTIONSTREAM_BLOB_STORE=f"s3://{BUCKET}/{prefix}",
        CAPTIONSTREAM_S3_ENDPOINT_URL=s3[0].endpoint,
        CAPTIONSTREAM_S3_REGION="us-east-1",
        CAPTIONSTREAM_JOB_TTL_S="3",
        CAPTIONSTREAM_JANITOR_INTERVAL_S="0.5",
        **aws_env,
    ) as stack:
        stack.start_worker()
        gateway = stack.start_gateway()
        job_id = gateway.upload(make_png(23, 17, color=(5, 50, 150))).json()["job_id"]
        assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"
        assert len(keys(raw, prefix=prefix)) == 1
        wait_until(lambda: gateway.status(job_id).status_code == 404, 30, "the job to expire")
        wait_until(lambda: not keys(raw, prefix=prefix), 15, "its object to be deleted")


def test_gateway_and_worker_refuse_to_start_on_a_missing_bucket(
    s3: tuple[S3Server, dict[str, str]], aws_env: dict[str, str], tmp_path: Path
) -> None:
    """The start-up check is wired in: both exit with the cause, the worker before it
    loads a model, neither waiting for Kafka (there is none here)."""
    (tmp_path / "logs").mkdir()
    stack = Stack(
        bootstrap=f"127.0.0.1:{free_port()}", data_dir=tmp_path / "data", log_dir=tmp_path / "logs"
    )
    env = {
        "CAPTIONSTREAM_BLOB_STORE": "s3://no-such-bucket/images",
        "CAPTIONSTREAM_S3_ENDPOINT_URL": s3[0].endpoint,
        **aws_env,
    }
    try:
        parts = [stack.spawn("worker", **env), stack.spawn("gateway", **env)]
        for part in parts:
            assert part.proc.wait(60) != 0
            assert "bucket 'no-such-bucket' does not exist" in part.log()
        assert "loaded model" not in parts[0].log()
    finally:
        stack.stop_all()
