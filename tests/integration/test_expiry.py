"""Job TTL: a finished job's state and image are really deleted, everywhere; jobs that
are still needed are not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from captionstream.schemas.events import decode_caption_event
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.stack import Stack, own_stack, read_topic, wait_until

pytestmark = pytest.mark.brokers("embedded", "apache")

TTL_S = 3.0


@pytest.fixture
def short_lived(tmp_path_factory: pytest.TempPathFactory, broker_kind: str) -> Iterator[Stack]:
    with own_stack(
        tmp_path_factory.mktemp("ttl"),
        broker_kind=broker_kind,
        CAPTIONSTREAM_JOB_TTL_S=str(TTL_S),
        CAPTIONSTREAM_JANITOR_INTERVAL_S="0.5",
    ) as stack:
        yield stack


def blob_paths(stack: Stack) -> set[Path]:
    return {p for p in (stack.data_dir / "blobs").rglob("*") if p.is_file()}


def test_finished_jobs_and_their_images_expire(short_lived: Stack) -> None:
    stack = short_lived
    stack.start_worker()
    gateway = stack.start_gateway()
    image = make_png(21, 12, color=(2, 4, 8))
    key = {"Idempotency-Key": f"expiry-{stack.broker_kind}"}
    job_id = gateway.upload(image, headers=key).json()["job_id"]
    assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"
    cached = gateway.upload(image).json()  # answered from the caption cache
    assert cached["cache_hit"] is True
    assert len(blob_paths(stack)) == 1

    wait_until(lambda: gateway.status(job_id).status_code == 404, 30, "the job to expire")
    wait_until(lambda: gateway.status(cached["job_id"]).status_code == 404, 30, "cache hit too")
    wait_until(lambda: not blob_paths(stack), 10, "its image to be deleted")

    # Really deleted: a gateway rebuilding its view from the topic does not know them.
    fresh = stack.start_gateway()
    assert fresh.status(job_id).status_code == 404
    assert fresh.status(cached["job_id"]).status_code == 404
    # The same image again is a new job (no stale cache entry), and it works.
    again = fresh.upload(image).json()
    assert again["cache_hit"] is False
    assert fresh.wait_terminal(again["job_id"])["status"] == "SUCCESS"
    ref_path = {urlparse(p.as_uri()).path for p in blob_paths(stack)}
    assert len(ref_path) == 1

    # The key sent again after its job expired: a new job under the same id, whose
    # caption event a consumer dropping repeats by event id must not take for the old one.
    reused = fresh.upload(make_png(22, 12, color=(2, 4, 8)), headers=key).json()
    assert reused["job_id"] == job_id
    assert fresh.wait_terminal(job_id)["status"] == "SUCCESS"
    events = [
        decode_caption_event(value)
        for key_bytes, value in asyncio.run(read_topic(stack.bootstrap, TOPICS.captions.name))
        if key_bytes == job_id.encode()
    ]
    assert len({e.submitted_at for e in events}) == 2, events
    assert len({e.event_id for e in events}) == 2, "one event id per job, not per job id"
