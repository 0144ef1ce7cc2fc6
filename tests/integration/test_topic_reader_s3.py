"""Reading a topic from its end on the embedded broker with s3:// storage.

Tansu on s3:// answers ListOffsets from the stored batch written last by S3's
Last-Modified, which has one-second resolution: records written within one second are
missed, so the "end" can lie far behind. `start_topic_reader(from_end=True)` (used by
`captionstream tail`) must start after every record already there, and print only new ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.harness import s3_server
from captionstream.broker import EmbeddedBroker, free_port
from captionstream.kafka import KafkaConnection, start_topic_reader
from captionstream.settings import KafkaProfile

TOPIC = "reader-test"


@pytest.fixture
def durable_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with s3_server(tmp_path / "moto.log") as s3:
        broker = EmbeddedBroker(
            port=free_port(),
            log_file=tmp_path / "tansu.log",
            storage=s3.storage,
            env=s3.tansu_env(),
        )
        with broker:
            yield broker


async def test_reading_from_the_end_skips_every_earlier_record(
    durable_broker: EmbeddedBroker,
) -> None:
    bootstrap = durable_broker.bootstrap
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1)
    await producer.start()
    try:
        for i in range(15):  # well within one second: what ListOffsets gets wrong
            await producer.send_and_wait(TOPIC, f"old-{i}".encode(), partition=0)
        probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await probe.start()
        try:
            listed = await probe.end_offsets([TopicPartition(TOPIC, 0)])
        finally:
            await probe.stop()

        kafka = KafkaConnection(bootstrap, KafkaProfile.EMBEDDED)
        reader = await start_topic_reader(kafka, TOPIC, from_end=True)
        try:
            assert await reader.position(TopicPartition(TOPIC, 0)) == 15, (
                f"ListOffsets said {listed}"
            )
            await producer.send_and_wait(TOPIC, b"new", partition=0)
            seen: list[bytes] = []
            for _ in range(20):
                for records in (await reader.getmany(timeout_ms=500)).values():
                    seen.extend(r.value for r in records)
                if seen:
                    break
            assert seen == [b"new"]
        finally:
            await reader.stop()
    finally:
        await producer.stop()
