"""The only places this project reaches into aiokafka's internals, each with why.

aiokafka 0.14 has no public API for these two things; tests/unit/test_kafka_compat.py
pins the attributes used, so an upgrade that moves them fails there, not in production.
"""

from __future__ import annotations

import contextlib

from aiokafka import AIOKafkaConsumer


async def track_topic(consumer: AIOKafkaConsumer, topic: str) -> None:
    """Make a group-less consumer fetch metadata for `topic` now.

    Its cached metadata comes from its start; a topic whose partitions had no leader yet
    (created a moment before, as on Apache Kafka) is left out of it, and `topics()`
    fetches fresh metadata without keeping it. Tracking the topic refreshes the cache.
    """
    await consumer._client.add_topic(topic)


async def close_connections(consumer: AIOKafkaConsumer) -> None:
    """Close the consumer's broker connections (after a `stop()` that was cut short)."""
    with contextlib.suppress(Exception):
        await consumer._client.close()
