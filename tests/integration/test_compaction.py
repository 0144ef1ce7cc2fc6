"""Job state survives log compaction: after Apache Kafka's cleaner has left one record
per job on the job-state topic, a gateway started then answers for every job exactly
what it answered before: SUCCESS with its caption, a retried job's SUCCESS, a failed
job's FAILURE with its reason.

The topic is compacted (cleanup.policy=compact), so this is what any gateway started
after the cleaner ran sees in production. It holds because a gateway writes a job's
PENDING state before its image event (ingest/kafka_publishing.py), so the record compaction
keeps, the last, is the job's latest state. Apache Kafka only: the cleaner is its own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer

from captionstream.schemas.events import decode_job_state
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.apache import create_topic
from tests.integration.flaky import ALWAYS_FAILS, FLAKY_ONCE
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
        # Some jobs go through retries (several STARTED and RETRY records) or fail.
        CAPTIONSTREAM_CAPTIONER="tests.integration.flaky:create",
        CAPTIONSTREAM_MAX_ATTEMPTS="3",
        CAPTIONSTREAM_RETRY_BACKOFF_S="0.2",
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
    # The flaky job goes alone, so its failure is its batch's and it is retried.
    colors = [FLAKY_ONCE, *[(i, 40, 90) for i in range(JOBS - 2)], ALWAYS_FAILS]
    job_ids = []
    finals = {}
    for i, color in enumerate(colors):
        response = gateway.upload(make_png(20 + i, 20, color=color), f"{i}.png")
        assert response.status_code == 202, response.text
        job_ids.append(response.json()["job_id"])
        if i == 0:
            finals[job_ids[0]] = gateway.wait_terminal(job_ids[0])
    finals |= {job_id: gateway.wait_terminal(job_id) for job_id in job_ids[1:]}
    expected = {j: "SUCCESS" for j in job_ids[:-1]} | {job_ids[-1]: "FAILURE"}
    assert {j: f["status"] for j, f in finals.items()} == expected
    assert finals[job_ids[0]]["attempts"] == 2, "the flaky job was retried once"

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
        key.decode(): decode_job_state(value).status.value
        for key, value in await read_topic(stack.bootstrap, TOPICS.job_state.name, timeout_s=10)
        if value is not None and key.decode() in job_ids
    }
    assert survivors == expected, "each job's last record is its result"

    # A gateway that starts now reads only the compacted topic.
    fresh = stack.start_gateway()
    views = await fresh.statuses(job_ids)
    assert views == finals, "the same answers as before compaction"
