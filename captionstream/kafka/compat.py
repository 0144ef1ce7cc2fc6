"""The only places this project reaches into aiokafka's and Faust's internals, each with
why.

aiokafka 0.14 and Faust 0.x have no public API for these things;
tests/unit/test_kafka_compat.py pins what is used, so an upgrade that moves it fails
there, not in production.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

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


@contextlib.contextmanager
def as_current_event(event: Any) -> Iterator[None]:
    """Make `event` Faust's "current event" inside the block, in this task only.

    A Faust table reads and writes the partition of the current event; a worker handling
    a batch from several partitions names each access's own event. Faust offers no
    public setter: `Stream._set_current_event` also sets the stream attribute
    `take_events` reads to buffer the next message (it swapped buffered events: one job
    was processed twice and another never), so only the context variable is set.
    """
    # Faust is the processor's dependency: imported only where a worker needs it.
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)
