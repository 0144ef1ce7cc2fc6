"""The whole path on real parts: HTTP upload -> Kafka -> Faust/BLIP -> captions topic ->
job-state topic -> gateway view -> WebSocket push and REST status."""

from __future__ import annotations

import json

import pytest
import websockets

from captionstream.schemas.events import (
    CaptionProduced,
    ImageSubmitted,
    JobState,
    caption_event_id,
    decode_caption_event,
    utcnow,
)
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.stack import Component, Stack, read_topic

pytestmark = pytest.mark.brokers("embedded", "apache")

ORDER = ["PENDING", "STARTED", "SUCCESS"]


async def test_upload_push_caption_event_and_status(stack: Stack, worker: Component) -> None:
    gateway = stack.start_gateway()
    response = gateway.upload(make_png(80, 60), "cat.png")
    assert response.status_code == 202, response.text
    accepted = response.json()
    job_id = accepted["job_id"]
    assert accepted["status"] == "PENDING"
    assert response.headers["location"] == f"/api/v1/status/{job_id}"

    # The WebSocket sends the current state first, then every change, then closes.
    pushed = []
    async with websockets.connect(f"{gateway.ws_url}/api/v1/ws/{job_id}") as ws:
        async for message in ws:
            pushed.append(json.loads(message))
    statuses = [m["status"] for m in pushed]
    assert statuses[-1] == "SUCCESS", pushed
    assert statuses == sorted(statuses, key=ORDER.index), "pushes arrive in lifecycle order"
    assert len(set(statuses)) == len(statuses), "no status is pushed twice"
    caption = pushed[-1]["result"]["caption"]
    assert isinstance(caption, str)

    # Downstream consumers read the same result from the public captions topic.
    records = await read_topic(stack.bootstrap, TOPICS.captions.name)
    events = [decode_caption_event(v) for k, v in records if k == job_id.encode()]
    assert len(events) == 1
    [event] = events
    assert isinstance(event, CaptionProduced)
    assert event.caption == caption
    assert event.event_id == caption_event_id(job_id, event.submitted_at)
    assert event.model == "tiny-blip"

    status = gateway.status(job_id).json()
    assert status["status"] == "SUCCESS"
    assert status["result"] == {"caption": caption}
    assert status["attempts"] == 1


async def test_missing_image_fails_its_job_and_worker_lives_on(
    stack: Stack, worker: Component
) -> None:
    """An event whose image is gone ends FAILURE with a reason; the next job still works."""
    gateway = stack.start_gateway()
    ghost = ImageSubmitted(
        job_id="ghost-" + utcnow().strftime("%H%M%S%f"),
        image_ref=(stack.data_dir / "blobs" / "00" / ("0" * 64 + ".png")).as_uri(),
        content_type="image/png",
        size_bytes=1,
        width=1,
        height=1,
        sha256="0" * 64,
        submitted_at=utcnow(),
    )
    producer = stack.kafka.producer()
    await producer.start()
    try:
        key = ghost.job_id.encode()
        pending = JobState.pending(ghost.job_id, ghost.submitted_at)
        await producer.send_and_wait(
            TOPICS.job_state.name, pending.model_dump_json().encode(), key=key
        )
        await producer.send_and_wait(TOPICS.images.name, b"this is not an event", key=b"junk")
        await producer.send_and_wait(TOPICS.images.name, ghost.model_dump_json().encode(), key=key)
    finally:
        await producer.stop()

    failed = gateway.wait_terminal(ghost.job_id)
    assert failed["status"] == "FAILURE"
    assert "not in the blob store" in str(failed["error"])

    ok = gateway.upload(make_png(color=(0, 0, 255))).json()["job_id"]
    assert gateway.wait_terminal(ok)["status"] == "SUCCESS"
    assert worker.alive()


async def test_restarted_gateway_still_answers_old_jobs(stack: Stack, worker: Component) -> None:
    first = stack.start_gateway()
    job_id = first.upload(make_png(color=(0, 255, 0))).json()["job_id"]
    done = first.wait_terminal(job_id)
    assert done["status"] == "SUCCESS"

    # A second replica that never saw the upload answers from the job-state topic.
    replica = stack.start_gateway()
    assert replica.status(job_id).json() == done

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it as its exit status.
    assert first.component is not None
    assert first.component.stop() in (0, -15)
    assert "Application shutdown complete" in first.component.log()
    restarted = stack.start_gateway()
    body = restarted.status(job_id).json()
    assert body == done
    async with websockets.connect(f"{restarted.ws_url}/api/v1/ws/{job_id}") as ws:
        messages = [json.loads(m) async for m in ws]
    assert [m["status"] for m in messages] == ["SUCCESS"]
