"""Kafka client tuning and topic set-up, shared by the gateway, the processor and tools.

Everything that exists only because the embedded broker (Tansu) misbehaves lives in
`EMBEDDED_PROFILE`; the `kafka` profile is plain library defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from captionstream.errors import BrokerError
from captionstream.settings import CommonSettings, KafkaProfile
from schemas.topics import TOPICS, TopicSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientTuning:
    # One record per produce batch. Tansu reports end offsets as "base offset of the last
    # batch + 1", which breaks end_offsets(), lag and Faust's rocksdb recovery otherwise.
    producer_max_batch_size: int | None = None
    # Take end offsets from the high watermark of a fetch response, never from ListOffsets
    # alone. Tansu 0.6.0 on s3:// storage answers ListOffsets(latest) from a listing of
    # the partition's batch objects: it takes the batch with the newest S3 Last-Modified,
    # and of batches stored within the same second (S3's resolution) the *first*, then
    # answers its base offset + its record count. Any batches stored later in that
    # second are missed: 1 after 12 records, 13 after 15. No client setting changes that
    # (batch size, isolation level, API version: measured). Its fetch responses carry
    # the watermark the broker keeps for each partition, which is right. Faust's table
    # recovery reads end offsets (ListOffsets) to know where a changelog ends: too low,
    # a restarted worker crashed (ConsistencyError) or recovered its tables partly.
    # See `fetch_highwaters` and processor/tansu.py.
    highwaters_from_fetch: bool = False
    # Tansu holds JoinGroup for session_timeout/2: a short session makes rebalances fast.
    session_timeout_s: float | None = None
    heartbeat_interval_s: float | None = None

    def aiokafka_producer_kwargs(self) -> dict[str, Any]:
        return (
            {}
            if self.producer_max_batch_size is None
            else {"max_batch_size": self.producer_max_batch_size}
        )

    def aiokafka_consumer_kwargs(self) -> dict[str, Any]:
        """For consumers in a group (group-less readers need nothing)."""
        kwargs: dict[str, Any] = {}
        if self.session_timeout_s is not None:
            kwargs["session_timeout_ms"] = int(self.session_timeout_s * 1000)
        if self.heartbeat_interval_s is not None:
            kwargs["heartbeat_interval_ms"] = int(self.heartbeat_interval_s * 1000)
        return kwargs

    def faust_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.producer_max_batch_size is not None:
            kwargs["producer_max_batch_size"] = self.producer_max_batch_size
        if self.session_timeout_s is not None:
            kwargs["broker_session_timeout"] = self.session_timeout_s
        if self.heartbeat_interval_s is not None:
            kwargs["broker_heartbeat_interval"] = self.heartbeat_interval_s
        return kwargs


KAFKA_PROFILE = ClientTuning()
EMBEDDED_PROFILE = ClientTuning(
    producer_max_batch_size=1,
    session_timeout_s=4.0,
    heartbeat_interval_s=1.0,
    highwaters_from_fetch=True,
)


def tuning_for(profile: KafkaProfile) -> ClientTuning:
    return EMBEDDED_PROFILE if profile is KafkaProfile.EMBEDDED else KAFKA_PROFILE


def topic_config(spec: TopicSpec) -> dict[str, str]:
    return {"cleanup.policy": "compact"} if spec.compacted else {}


async def ensure_topics(
    settings: CommonSettings, topics: tuple[TopicSpec, ...] = TOPICS.all(), timeout_s: float = 30
) -> None:
    """Create the project's topics if missing (idempotent; safe from every component)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        raise BrokerError(
            f"cannot reach Kafka at {settings.bootstrap} ({exc!r}); start it with "
            "`captionstream broker` or set CAPTIONSTREAM_KAFKA_BOOTSTRAP"
        ) from exc
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=spec.name,
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=topic_config(spec),
            )
            for spec in topics
            if spec.name not in existing
        ]
        if missing:
            log.info("creating topics %s", [t.name for t in missing])
            with contextlib.suppress(TopicAlreadyExistsError):  # another component won
                await admin.create_topics(missing)
    finally:
        await admin.close()


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
        with contextlib.suppress(Exception):
            await consumer._client.close()


async def assign_whole_topic(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of `topic` to a group-less consumer, from the beginning.

    For readers that need the whole topic (the gateway's view, tools, tests).
    """
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer.topics()  # refreshes metadata
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise BrokerError(f"topic {topic!r} does not exist")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


async def start_topic_reader(
    bootstrap: str, topic: str, *, from_end: bool = False
) -> AIOKafkaConsumer:
    """A started group-less consumer holding every partition of `topic`, positioned at the
    beginning or at the end. The end is the fetch high watermark (`fetch_highwaters`), not
    ListOffsets alone, which the embedded broker answers too low on s3:// storage (and on
    memory:// when a produce batch held several records). For tools that read a whole
    topic; the caller stops it.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    try:
        await consumer.start()
        tps = await assign_whole_topic(consumer, topic)
        if from_end:
            for tp, end in (await fetch_highwaters(bootstrap, tps)).items():
                consumer.seek(tp, end)
    except (KafkaError, OSError) as exc:
        await stop_consumer(consumer)
        raise BrokerError(
            f"cannot read {topic} from Kafka at {bootstrap} ({exc!r}); start it with "
            "`captionstream broker` or set CAPTIONSTREAM_KAFKA_BOOTSTRAP"
        ) from exc
    except BaseException:
        await stop_consumer(consumer)
        raise
    return consumer


async def fetch_highwaters(
    bootstrap: str, tps: Collection[TopicPartition], timeout_s: float = 30
) -> dict[TopicPartition, int]:
    """The end offset of each partition, as the high watermark of a fetch response.

    What `end_offsets()` answers on a sound broker; on the embedded broker with s3://
    storage ListOffsets can answer too low (see `ClientTuning.highwaters_from_fetch`)
    while fetches are right. A group-less consumer of its own fetches from ListOffsets'
    answer (at most the end, so only the tail is read) and keeps the high watermark.
    """
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign(list(tps))
        listed = await consumer.end_offsets(list(tps))
        for tp, offset in listed.items():
            consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while missing := [tp for tp in tps if consumer.highwater(tp) is None]:
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerError(f"no fetch response for {missing} within {timeout_s}s")
            await consumer.getmany(*missing, timeout_ms=200, max_records=1)
        return {tp: max(listed[tp], consumer.highwater(tp)) for tp in tps}
    finally:
        await stop_consumer(consumer)


def submission_producer(settings: CommonSettings, timeout_s: float) -> AIOKafkaProducer:
    """The producer that accepts jobs (gateway, bulk ingest): acks from all replicas,
    and a submit waits at most `timeout_s` for Kafka before it fails."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap,
        acks="all",
        request_timeout_ms=int(timeout_s * 1000),
        **tuning_for(settings.profile).aiokafka_producer_kwargs(),
    )


async def read_record_at(
    bootstrap: str, tp: TopicPartition, offset: int, timeout_s: float = 10
) -> ConsumerRecord[bytes, bytes] | None:
    """The first record of `tp` at or after `offset` (compaction may have removed the one
    at `offset`), or None when there is none before the partition's end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
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
            highwater = consumer.highwater(tp)
            if highwater is not None and offset >= highwater:
                return None
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerError(f"no record of {tp} at offset {offset} within {timeout_s}s")
    finally:
        await stop_consumer(consumer)


async def list_topics(bootstrap: str) -> set[str]:
    """The names of the topics the cluster has."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        return set(await consumer.topics())
    finally:
        await stop_consumer(consumer)
