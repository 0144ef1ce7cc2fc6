"""The embedded broker on durable (S3) storage is SIGKILLed in the middle of the work and
started again on the same port and storage; the worker and the gateway are left alone.

While it is down, submits answer 503 and leave no trace. Once it is back, the worker and
the gateway reconnect by themselves, and every job accepted before (202) ends SUCCESS
with exactly one caption.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest

from schemas.events import CaptionProduced, caption_event_id, decode_caption_event
from schemas.topics import TOPICS
from tests.conftest import make_png
from tests.integration.stack import (
    Gateway,
    Stack,
    own_stack,
    read_topic,
    s3_server,
    wait_until,
)

JOBS = 40
TERMINAL = ("SUCCESS", "FAILURE")


@pytest.fixture
def durable_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("durable")
    with (
        s3_server(root / "moto.log") as s3,
        own_stack(
            root,
            s3=s3,
            # Slow enough that the broker dies with jobs in flight.
            CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create_slow",
            CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE="0.1",
            CAPTIONSTREAM_MAX_BATCH_SIZE="4",
        ) as stack,
    ):
        yield stack


def image(i: int) -> bytes:
    # Distinct images, so the caption cache answers none of them.
    return make_png(16 + i % 40, 16 + i // 40, color=(i % 256, 99, 13))


async def submit(client: httpx.AsyncClient, i: int) -> httpx.Response:
    return await client.post("/api/v1/upload", files={"file": (f"{i}.png", image(i))})


async def statuses(gateway: Gateway, job_ids: list[str]) -> dict[str, dict[str, object]]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        responses = await asyncio.gather(*(client.get(f"/api/v1/status/{j}") for j in job_ids))
    return {j: r.json() for j, r in zip(job_ids, responses, strict=True)}


def finished(gateway: Gateway, job_ids: list[str]) -> int:
    views = asyncio.run(statuses(gateway, job_ids))
    return sum(v.get("status") in TERMINAL for v in views.values())


async def test_broker_sigkill_and_restart_loses_no_accepted_job(durable_stack: Stack) -> None:
    stack = durable_stack
    broker = stack.broker
    assert broker is not None
    assert broker.storage.startswith("s3://")
    worker = stack.start_worker()
    gateway = stack.start_gateway(CAPTIONSTREAM_KAFKA_TIMEOUT_S="3")

    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        responses = await asyncio.gather(*(submit(client, i) for i in range(JOBS)))
    assert [r.status_code for r in responses] == [202] * JOBS, responses[0].text
    accepted = [str(r.json()["job_id"]) for r in responses]

    # SIGKILL, not SIGTERM: Tansu writes each produce to S3 before acknowledging it, so
    # even a broker that gets no chance to flush anything must keep every acked record.
    await asyncio.to_thread(
        wait_until, lambda: finished(gateway, accepted) >= 4, 60, "the first results"
    )
    broker.stop(sig=signal.SIGKILL)
    killed_at = time.monotonic()
    done_at_kill = await asyncio.to_thread(finished, gateway, accepted)
    assert done_at_kill < JOBS, "the broker must die while jobs are still in flight"

    # Down: a submit is refused at once (within the Kafka timeout) and leaves no trace.
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        refused = await asyncio.gather(*(submit(client, JOBS + i) for i in range(3)))
    assert [r.status_code for r in refused] == [503] * 3, refused[0].text
    assert all("Kafka" in r.json()["detail"] for r in refused)
    assert gateway.healthy()
    down_s = time.monotonic() - killed_at

    # Back on the same port and storage; nothing else is restarted.
    broker.start()
    restarted_at = time.monotonic()

    def submit_again() -> bool:
        response = gateway.upload(image(JOBS + 10))
        if response.status_code == 202:
            accepted.append(str(response.json()["job_id"]))
            return True
        assert response.status_code == 503, response.text
        return False

    await asyncio.to_thread(wait_until, submit_again, 60, "a submit to be accepted again")
    submits_back_s = time.monotonic() - restarted_at
    await asyncio.to_thread(
        wait_until,
        lambda: finished(gateway, accepted) == len(accepted),
        90,
        "every accepted job to finish after the restart",
    )
    all_done_s = time.monotonic() - restarted_at
    print(
        f"\nbroker down {down_s:.1f}s with {done_at_kill}/{JOBS} jobs done; after its "
        f"restart submits accepted in {submits_back_s:.1f}s, all "
        f"{len(accepted)} jobs done in {all_done_s:.1f}s"
    )

    views = await statuses(gateway, accepted)
    assert {v["status"] for v in views.values()} == {"SUCCESS"}, views
    for component in stack.components:
        assert component.alive(), f"{component.name} died:\n{component.log()[-3000:]}"
    assert worker.proc.pid == stack.components[0].proc.pid

    # Exactly one caption per accepted job (redelivered copies agree, same event id).
    captions: dict[str, set[str]] = defaultdict(set)
    event_ids: dict[str, set[str]] = defaultdict(set)
    for key, value in await read_topic(stack.bootstrap, TOPICS.captions.name):
        event = decode_caption_event(value)
        assert isinstance(event, CaptionProduced)
        captions[key.decode()].add(event.caption)
        event_ids[key.decode()].add(event.event_id)
    assert set(captions) == set(accepted), "captions for exactly the accepted jobs"
    for job_id in accepted:
        assert len(captions[job_id]) == 1, f"job {job_id} got different captions"
        assert event_ids[job_id] == {caption_event_id(job_id)}
        result = views[job_id]["result"]
        assert isinstance(result, dict)
        assert result["caption"] in captions[job_id]

    # A gateway started now has rebuilt its whole view before it serves.
    fresh = stack.start_gateway()
    assert await statuses(fresh, accepted) == views

    # The refused submits were not half-accepted: no image event, no job state.
    images = {k.decode() for k, _ in await read_topic(stack.bootstrap, TOPICS.images.name)}
    states = {k.decode() for k, _ in await read_topic(stack.bootstrap, TOPICS.job_state.name)}
    assert images == set(accepted)
    assert states == set(accepted)
