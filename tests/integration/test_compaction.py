"""Job state survives log compaction: after Apache Kafka's cleaner has left one record
per job on the job-state topic, a gateway started then shows every finished job as
finished, with its caption.

The topic is compacted (cleanup.policy=compact), so this is what any gateway started
after the cleaner ran sees in production. It holds because a gateway writes a job's
PENDING state before its image event (gateway/publisher.py), so the record compaction
keeps, the last, is the job's latest state. Apache Kafka only: the cleaner is its own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer

from schemas.events import JobStatus, decode_job_state
from schemas.topics import TOPICS
from tests.conftest import make_png
from tests.integration.apache import create_topic
from tests.integration.stack import Stack, own_stack, read_topic, wait_until

pytestmark = pytest.mark.brokers("apache")

JOBS = 24
PARTITIONS = 4


@pytest.fixture
def compacting_stack(tmp_path_factory: pytest.TempPathFactory, broker_kind: str) -> Iterator[Stack]:
    with own_stack(
        tmp_path_factory.mktemp("compaction"),
        broker_kind=broker_kind,
        CAPTIONSTREAM_PARTITIONS=str(PARTITIONS),
    ) as stack:
        # The plan's topic (compacted, same partitions), with segments that roll every
        # 100 ms and a cleaner that runs on any dirt (the launcher checks for work every
        # 0.5 s): compaction within seconds instead of days. Created before any component
        # starts, so the plan finds it and checks it.
        asyncio.run(
            create_topic(
                stack.bootstrap,
                TOPICS.job_state.name,
                partitions=PARTITIONS,
                configs={
                    "cleanup.policy": "compact",
                    "segment.ms": "100",
                    "min.cleanable.dirty.ratio": "0.01",
                },
            )
        )
        yield stack


async def roll_segments(bootstrap: str) -> None:
    """Write a tombstone for a key no job has to every partition: the active segment
    (which the cleaner never touches) rolls, so every job's records become cleanable."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition in range(PARTITIONS):
            await producer.send_and_wait(
                TOPICS.job_state.name, None, key=b"segment-roll", partition=partition
            )
    finally:
        await producer.stop()


async def test_a_gateway_started_after_compaction_shows_every_job_finished(
    compacting_stack: Stack,
) -> None:
    stack = compacting_stack
    stack.start_worker()
    gateway = stack.start_gateway()
    job_ids = []
    for i in range(JOBS):
        response = gateway.upload(make_png(20 + i, 20, color=(i, 40, 90)), f"{i}.png")
        assert response.status_code == 202, response.text
        job_ids.append(response.json()["job_id"])
    for job_id in job_ids:
        assert gateway.wait_terminal(job_id)["status"] == "SUCCESS"
    captions = {j: v["result"]["caption"] for j, v in (await gateway.statuses(job_ids)).items()}  # type: ignore[index]

    # Compaction has run once no job has more than one record left (each has at least
    # PENDING, STARTED and SUCCESS before it).
    async def records_per_job() -> Counter[str]:
        await asyncio.sleep(0.2)  # past segment.ms, so the next write rolls
        await roll_segments(stack.bootstrap)
        records = await read_topic(stack.bootstrap, TOPICS.job_state.name, timeout_s=10)
        return Counter(key.decode() for key, _ in records if key.decode() in job_ids)

    def compacted() -> bool:
        counts = asyncio.run(records_per_job())
        return set(counts) == set(job_ids) and max(counts.values()) == 1

    await asyncio.to_thread(wait_until, compacted, 90, "the cleaner to compact the job states", 1.0)
    survivors = {
        key.decode(): decode_job_state(value)
        for key, value in await read_topic(stack.bootstrap, TOPICS.job_state.name, timeout_s=10)
        if value is not None and key.decode() in job_ids
    }
    assert {s.status for s in survivors.values()} == {JobStatus.SUCCESS}, "the last is the result"

    # A gateway that starts now reads only the compacted topic.
    fresh = stack.start_gateway()
    views = await fresh.statuses(job_ids)
    assert {v["status"] for v in views.values()} == {"SUCCESS"}
    assert {j: v["result"]["caption"] for j, v in views.items()} == captions  # type: ignore[index]
