"""Idempotency-Key: a retried submit returns the job the first request created, on
any replica and after restarts; reusing a key for another request is a 409."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from captionstream.schemas.events import decode_image_submitted
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.stack import Component, Gateway, Stack, read_topic

pytestmark = pytest.mark.brokers("embedded", "apache")


def upload(gateway: Gateway, data: bytes, key: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/api/v1/upload",
        files={"file": ("a.png", data)},
        headers={"Idempotency-Key": key},
        timeout=30,
    )


async def test_retries_with_the_same_key_get_the_same_job(stack: Stack, worker: Component) -> None:
    gateway = stack.start_gateway()
    key = str(uuid.uuid4())
    image = make_png(color=(1, 99, 1))

    # Concurrent retries (a client timing out and retrying) create one job.
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/api/v1/upload",
                    files={"file": ("a.png", image)},
                    headers={"Idempotency-Key": key},
                )
                for _ in range(5)
            )
        )
    assert {r.status_code for r in responses} == {202}
    job_ids = {r.json()["job_id"] for r in responses}
    assert len(job_ids) == 1
    [job_id] = job_ids
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 4

    conflict = upload(gateway, make_png(color=(2, 99, 2)), key)
    assert conflict.status_code == 409
    assert "different request" in conflict.json()["detail"]

    assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"
    # Another replica, and a fresh gateway after the job finished, know the key too.
    replica = stack.start_gateway()
    again = upload(replica, image, key)
    assert again.status_code == 202
    assert again.json()["job_id"] == job_id
    assert again.json()["status"] == "SUCCESS"

    events = [
        decode_image_submitted(v)
        for _, v in await read_topic(stack.bootstrap, TOPICS.images.name)
        if b'"idempotency_key":"' + key.encode() in v
    ]
    assert [e.job_id for e in events] == [job_id], "exactly one image event for the key"


def test_without_a_key_every_submit_is_a_new_job(stack: Stack, worker: Component) -> None:
    gateway = stack.start_gateway()
    image = make_png(color=(5, 5, 55))
    first = gateway.upload(image).json()["job_id"]
    second = gateway.upload(image).json()["job_id"]
    assert first != second


async def test_replicas_racing_on_one_key_create_one_job(stack: Stack, worker: Component) -> None:
    """Each replica serializes a key only locally; the key-derived job id makes the
    replicas agree anyway: one job id, one caption, whichever replica answered."""
    replicas = [stack.start_gateway(), stack.start_gateway()]
    image = make_png(color=(7, 77, 177))
    for _round in range(3):
        key = str(uuid.uuid4())
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{replicas[i % 2].url}/api/v1/upload",
                        files={"file": ("a.png", image)},
                        headers={"Idempotency-Key": key},
                    )
                    for i in range(6)
                )
            )
        assert {r.status_code for r in responses} == {202}
        [job_id] = {r.json()["job_id"] for r in responses}
        for gateway in replicas:
            assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"
        captions = {
            v
            for k, v in await read_topic(stack.bootstrap, TOPICS.captions.name)
            if k == job_id.encode()
        }
        texts = {decode_caption_text(v) for v in captions}
        assert len(texts) == 1, f"one caption for the job, got {texts}"


def decode_caption_text(value: bytes) -> str:
    return str(json.loads(value)["caption"])
