"""Reading topics without a consumer group: whole topics, end offsets, single records.

For the gateway's view, tools (`tail`, bulk ingest) and the worker's start-up checks.
End offsets come from fetch responses (`fetch_highwaters`), which every broker answers
right; ListOffsets alone is wrong on the embedded broker (see `profiles.ClientTuning`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from captionstream.errors import BrokerError
from captionstream.kafka.compat import close_connections, track_topic
from captionstream.kafka.connection import KafkaConnection

log = logging.getLogger(__name__)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()`, minus aiokafka's stray CancelledError when the broker just left.

    aiokafka's `Fetcher.close()` cancels its pending fetches and awaits each; a fetch that
    failed (broker gone) and is sleeping out `retry_backoff_ms` does not catch that
    cancellation, so `stop()` raises CancelledError. Ctrl-C on `captionstream up` stops
    the broker and the gateway at once and hit exactly that: the gateway's shutdown
    failed and `up` exited 1. The consumer is closed by then except for its connections,
    which are closed here. A cancellation of the caller itself still propagates.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        log.info("Kafka consumer stopped while a fetch waited out its retry backoff")
        await close_connections(consumer)


Polled = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


async def polls(
    consumer: AIOKafkaConsumer, what: str, *, timeout_ms: int = 500, retry_s: float = 1.0
) -> AsyncIterator[Polled]:
    """Every `getmany()` answer of a started consumer, forever; the one read loop of every
    long-running reader (the gateway's view, webhooks, `tail`, bulk ingest).

    Empty answers are yielded too, so callers do their periodic work (catch-up checks,
    commits, back-pressure) while a topic is quiet. A Kafka error is retried after
    `retry_s` with a warning naming `what` is read: a broker restart or a rebalance is
    not a reason for a reader to stop.
    """
    while True:
        try:
            polled = await consumer.getmany(timeout_ms=timeout_ms)
        except KafkaError as exc:
            log.warning("fetch of %s failed (%r); retrying", what, exc)
            await asyncio.sleep(retry_s)
            continue
        yield polled


async def assign_whole_topic(
    consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 10
) -> list[TopicPartition]:
    """Assign every partition of `topic` to a group-less consumer, from the beginning.

    For readers that need the whole topic (the gateway's view, tools, tests). A topic
    just created may take a moment to reach every broker's metadata: asked again until
    `timeout_s`.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    partitions = consumer.partitions_for_topic(topic)
    while not partitions:
        await track_topic(consumer, topic)
        partitions = consumer.partitions_for_topic(topic)
        if not partitions and asyncio.get_running_loop().time() > deadline:
            raise BrokerError(f"topic {topic!r} does not exist")
        if not partitions:
            await asyncio.sleep(0.2)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


async def start_topic_reader(
    connection: KafkaConnection, topic: str, *, from_end: bool = False
) -> AIOKafkaConsumer:
    """A started group-less consumer holding every partition of `topic`, positioned at the
    beginning or at the end. The end is the fetch high watermark (`fetch_highwaters`), not
    ListOffsets alone, which the embedded broker answers too low on s3:// storage (and on
    memory:// when a produce batch held several records). For tools that read a whole
    topic; the caller stops it.
    """
    consumer = connection.reader()
    try:
        await consumer.start()
        tps = await assign_whole_topic(consumer, topic)
        if from_end:
            for tp, end in (await fetch_highwaters(connection, tps)).items():
                consumer.seek(tp, end)
    except (KafkaError, OSError) as exc:
        await stop_consumer(consumer)
        raise BrokerError(
            f"cannot read {topic} from Kafka at {connection.bootstrap} ({exc!r}); start it with "
            "`captionstream broker` or set CAPTIONSTREAM_KAFKA_BOOTSTRAP"
        ) from exc
    except BaseException:
        await stop_consumer(consumer)
        raise
    return consumer


def readable_end(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """Where `consumer` can read `tp` up to, from its last fetch response (None before
    one): the high watermark, or for a read_committed consumer the last stable offset
    (a transaction still open keeps records above it out of sight). A reader that waits
    for the high watermark instead would wait for every open transaction to end."""
    lso = consumer.last_stable_offset(tp)
    if lso is not None and lso >= 0:  # -1: read_uncommitted; None: not known yet
        return int(lso)
    highwater = consumer.highwater(tp)
    return None if highwater is None else int(highwater)


async def fetch_highwaters(
    connection: KafkaConnection, tps: Collection[TopicPartition], timeout_s: float = 30
) -> dict[TopicPartition, int]:
    """The end offset of each partition, as the high watermark of a fetch response.

    What `end_offsets()` answers on a sound broker; on the embedded broker with s3://
    storage ListOffsets can answer too low (see `profiles.ClientTuning.highwaters_from_fetch`)
    while fetches are right. A group-less consumer of its own fetches from ListOffsets'
    answer (at most the end, so only the tail is read) and keeps the high watermark.
    """
    if not tps:
        return {}
    consumer = connection.reader()
    await consumer.start()
    try:
        consumer.assign(list(tps))
        listed = await consumer.end_offsets(list(tps))
        for tp, offset in listed.items():
            consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while missing := [tp for tp in tps if readable_end(consumer, tp) is None]:
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerError(f"no fetch response for {missing} within {timeout_s}s")
            await consumer.getmany(*missing, timeout_ms=200, max_records=1)
        return {tp: max(listed[tp], readable_end(consumer, tp) or 0) for tp in tps}
    finally:
        await stop_consumer(consumer)


async def read_record_at(
    connection: KafkaConnection, tp: TopicPartition, offset: int, timeout_s: float = 10
) -> ConsumerRecord[bytes, bytes] | None:
    """The first record of `tp` at or after `offset` (compaction may have removed the one
    at `offset`), or None when there is none before the partition's end."""
    consumer = connection.reader()
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            batches = await consumer.getmany(tp, timeout_ms=200, max_records=1)
            records = batches.get(tp, [])
            if records:
                return records[0]
            end = readable_end(consumer, tp)
            if end is not None and offset >= end:
                return None
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerError(f"no record of {tp} at offset {offset} within {timeout_s}s")
    finally:
        await stop_consumer(consumer)


async def list_topics(connection: KafkaConnection) -> set[str]:
    """The names of the topics the cluster has."""
    consumer = connection.reader()
    await consumer.start()
    try:
        return set(await consumer.topics())
    finally:
        await stop_consumer(consumer)
