"""The worker's stale-state check reads its changelog through the real Kafka protocol."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from captionstream.broker import EmbeddedBroker
from captionstream.kafka import KafkaConnection
from captionstream.processor.table_state import ChangelogRecord, KafkaChangelogReader
from captionstream.settings import KafkaProfile


async def test_reader_finds_ends_and_the_record_at_an_offset(broker: EmbeddedBroker) -> None:
    topic = f"changelog-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_batch_size=1)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i}".encode(), partition=0)
        await producer.send_and_wait(topic, None, key=b"gone", partition=0)  # a tombstone
    finally:
        await producer.stop()

    reader = KafkaChangelogReader(KafkaConnection(broker.bootstrap, KafkaProfile.EMBEDDED))
    p0, p1, missing = TopicPartition(topic, 0), TopicPartition(topic, 1), TopicPartition("nope", 0)
    assert await reader.end_offsets([p0, p1, missing]) == {p0: 4, p1: 0, missing: 0}
    assert await reader.record_at(p0, 1) == ChangelogRecord(1, b"k1", b"v1")
    assert await reader.record_at(p0, 3) == ChangelogRecord(3, b"gone", None)
    assert await reader.record_at(p0, 4) is None  # nothing at the end
