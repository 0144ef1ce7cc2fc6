"""A worker restarted against the embedded broker on durable (s3://) storage.

Faust recovers the worker's tables (jobs, cancellations) from their changelogs up to each
changelog's end offset. Tansu on s3:// storage answers ListOffsets too low, so workers
take end offsets from fetch responses (`ClientTuning.highwaters_from_fetch`). Without
that, a worker restarted with its state directory crashed (`ConsistencyError`) and one
without it recovered its tables partly, so a redelivered finished job was captioned again.

Here the worker is stopped (SIGTERM), restarted on its old state, then killed (SIGKILL)
and replaced by one with no state at all; after each start, every image event read so
far is redelivered (produced again, as at-least-once delivery may) and new jobs are
submitted. All jobs end SUCCESS and each has exactly one caption event: the redelivered
finished jobs were recognised from the recovered table.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections import Counter

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.stack import Gateway, Stack, read_topic

JOBS_PER_ROUND = 6


async def submit_round(gateway: Gateway, first: int) -> list[str]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/api/v1/upload",
                    files={"file": (f"{i}.png", make_png(20 + i, 20, color=(i, 7, 99)))},
                )
                for i in range(first, first + JOBS_PER_ROUND)
            )
        )
    assert [r.status_code for r in responses] == [202] * JOBS_PER_ROUND, responses[0].text
    return [str(r.json()["job_id"]) for r in responses]


async def wait_success(gateway: Gateway, job_ids: list[str]) -> None:
    views = await asyncio.gather(*(asyncio.to_thread(gateway.wait_terminal, j) for j in job_ids))
    assert [v["status"] for v in views] == ["SUCCESS"] * len(job_ids), views


async def redeliver_images(stack: Stack) -> int:
    """Produce every image event again, as a redelivery would bring it back."""
    records = await read_topic(stack.bootstrap, TOPICS.images.name)
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, max_batch_size=1)
    await producer.start()
    try:
        for key, value in records:
            await (await producer.send(TOPICS.images.name, key=key, value=value))
    finally:
        await producer.stop()
    return len(records)


# A soak (`make soak`): three worker starts on the embedded broker's durable storage take
# 80-100 s; tests/unit/test_fetch_highwaters.py keeps the workaround itself in `make test`.
@pytest.mark.soak
@pytest.mark.durable_stack_env(
    CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create_slow",
    CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE="0",
)
async def test_worker_restarts_recover_tables_on_s3_storage(durable_stack: Stack) -> None:
    stack = durable_stack
    worker = stack.start_worker()
    gateway = stack.start_gateway()
    accepted = await submit_round(gateway, 0)
    await wait_success(gateway, accepted)

    # A restart on the old state dir, then a replacement with none (SIGKILL, state lost).
    for round_, sig in enumerate((signal.SIGTERM, signal.SIGKILL), start=1):
        await asyncio.sleep(3.5)  # past Faust's offset commit interval (2.8 s)
        worker.stop(sig)
        if sig == signal.SIGKILL:
            shutil.rmtree(stack.data_dir / "processor")
        worker = await asyncio.to_thread(stack.start_worker)
        redelivered = await redeliver_images(stack)
        assert redelivered >= len(accepted)
        new = await submit_round(gateway, round_ * JOBS_PER_ROUND)
        accepted += new
        await wait_success(gateway, accepted)
        assert worker.alive(), worker.log()[-3000:]
        assert "ConsistencyError" not in worker.log()

    # Settle: the last redelivered events are handled (skipped) before captions are read.
    await asyncio.sleep(2)
    captions = Counter(
        k.decode() for k, _ in await read_topic(stack.bootstrap, TOPICS.captions.name)
    )
    assert set(captions) == set(accepted)
    twice = {job: n for job, n in captions.items() if n != 1}
    assert not twice, f"finished jobs captioned again after a restart: {twice}"
