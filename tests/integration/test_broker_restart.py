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

import httpx
import pytest

from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.helpers.jobs import TERMINAL
from tests.integration.stack import (
    Gateway,
    Stack,
    check_one_caption_per_job,
    read_topic,
    wait_until,
)

JOBS = 40


def image(i: int) -> bytes:
    # Distinct images, so the caption cache answers none of them.
    return make_png(16 + i % 40, 16 + i // 40, color=(i % 256, 99, 13))


async def submit(client: httpx.AsyncClient, i: int) -> httpx.Response:
    return await client.post("/api/v1/upload", files={"file": (f"{i}.png", image(i))})


def finished(gateway: Gateway, job_ids: list[str]) -> int:
    views = asyncio.run(gateway.statuses(job_ids))
    return sum(v.get("status") in TERMINAL for v in views.values())


@pytest.mark.durable_stack_env(
    # Slow enough that the broker dies with jobs in flight.
    CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create_slow",
    CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE="0.1",
    CAPTIONSTREAM_MAX_BATCH_SIZE="4",
)
async def test_broker_sigkill_and_restart_loses_no_accepted_job(durable_stack: Stack) -> None:
    stack = durable_stack
    broker = stack.broker
    assert broker is not None
    assert broker.storage.startswith("s3://")
    worker = stack.start_worker()
    # Long enough for 40 submits at once on S3 storage (moto serves its PUTs one at a
    # time: at 3 s one of them timed out on a busy 2-core machine), short enough that a
    # submit while the broker is down is refused within the test's patience.
    gateway = stack.start_gateway(CAPTIONSTREAM_KAFKA_TIMEOUT_S="10")

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

    views = await gateway.statuses(accepted)
    assert {v["status"] for v in views.values()} == {"SUCCESS"}, views
    for component in stack.components:
        assert component.alive(), f"{component.name} died:\n{component.log()[-3000:]}"
    assert worker.proc.pid == stack.components[0].proc.pid

    # Exactly one caption per accepted job (redelivered copies agree, same event id).
    captions = await check_one_caption_per_job(stack.bootstrap, views, accepted)
    assert set(captions) == set(accepted), "captions for exactly the accepted jobs"

    # A gateway started now has rebuilt its whole view before it serves.
    fresh = stack.start_gateway(ready=False)  # as soon as it serves, not once ready
    assert await fresh.statuses(accepted) == views

    # The refused submits were not half-accepted: no image event, no job state.
    images = {k.decode() for k, _ in await read_topic(stack.bootstrap, TOPICS.images.name)}
    states = {k.decode() for k, _ in await read_topic(stack.bootstrap, TOPICS.job_state.name)}
    assert images == set(accepted)
    assert states == set(accepted)
