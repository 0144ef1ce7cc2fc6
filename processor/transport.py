"""The worker's Faust transport: the broker profile's (`KafkaConnection.faust_transport`:
producer idempotence, where end offsets come from), with what the worker needs of Faust
on every broker. Fixes of Faust's own behaviour, not broker workarounds:

- **No records lost when a rebalance ends (every profile).** When table recovery ends,
  Faust resumes the stream partitions, seeks them to their committed offsets and only
  then resumes `app.flow_control`, which empties every agent's queue; but the consumer's
  flow is already on at that point (recovery turned it on to read changelogs), so records
  fetched during the seek reach the queues and are thrown away with them. They are never
  acked, the partition's commits stop there, and the fetch position is past them: those
  jobs stayed PENDING until the next rebalance (seen as 3-10 jobs stuck after a worker was
  SIGKILLed, about one run in five). `FlowSafeRecovery` stops the flow first, so nothing
  is fetched between resuming the partitions and emptying the queues.
- **No records lost when a partition without a committed offset changes hands (every
  profile).** When table recovery ends, Faust seeks the stream partitions to their
  committed offsets; one its group never committed keeps whatever position the consumer
  reached meanwhile, and during recovery it may have fetched that partition to its end
  (records not delivered: the partition was not active yet). Its jobs then stayed
  PENDING for good (seen under exactly-once, where a worker killed before its first
  commit leaves such partitions behind). `RewindingConsumer` starts those at the
  beginning, as `auto_offset_reset=earliest` means.
- **Exactly-once (kafka profile, `processing_guarantee=exactly_once`).** Faust runs one
  transaction per input partition and commits each with the offsets of that partition.
  Three things in its implementation would still show a job's caption twice, or never:
  1. It picks a send's transaction from the destination partition *as its consumer's
     metadata knows it*; a worker reads neither the captions nor the job-state topic, so
     those sends went out with no transaction at all. `PartitionTransactions` picks the
     transaction from the job's partition: every topic of ours is keyed by job id with
     the same partition count, so that is also the input partition whose offsets the
     transaction commits.
  2. It commits from its own timer, concurrently with the agents: a commit in the middle
     of a batch made a caption visible while the table's SUCCESS for it (written after)
     went into the next transaction; a crash then redid the job and showed a second
     caption. `GatedConsumer` commits only while no agent holds the `CommitGate`, and the
     agents hold it for each batch (or control request) from first send to last write.
     Table writes reach Kafka later, through Faust's send buffer: `WriteTrackingTable`
     lets the agent wait until they are written before it opens the gate (without that,
     a job's SUCCESS in the table could miss the caption's transaction; a rebalance then
     replayed the job's older committed state over it, and the job was captioned twice).
  3. Its tables keep writes of aborted transactions: a store that still holds a job's
     uncommitted SUCCESS after its transaction was aborted skips the redelivered job
     for good. Tables then live in memory (rebuilt from the committed changelog when a
     worker starts), without standby replicas, and `FlowSafeTableManager` forgets the
     partitions a worker loses.
  (Where table recovery finds a changelog's end, under exactly-once too, is the
  profile transport's to say: `captionstream.kafka.faust_transport`.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any, Protocol

import faust
from aiokafka.partitioner import murmur2
from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.transport.consumer import TransactionManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import RecordMetadata

from captionstream.kafka import KafkaConnection
from captionstream.schemas.topics import TOPICS


def never_committed(
    assigned: Iterable[TP], committed: Mapping[TP, int | None], changelogs: Iterable[str]
) -> list[TP]:
    """The stream partitions of `assigned` with no committed offset."""
    skip = set(changelogs)
    return sorted(tp for tp in assigned if tp.topic not in skip and not committed.get(tp))


class RewindingConsumer(faust_aiokafka.Consumer):
    """Faust's consumer, seeking a never-committed stream partition to its beginning
    where Faust seeks to committed offsets (see the module docstring)."""

    async def perform_seek(self) -> None:
        await super().perform_seek()
        rewind = never_committed(
            self.assignment(), self._committed_offset, self.app.tables.changelog_topics
        )
        if rewind:
            earliest = await self.earliest_offsets(*rewind)
            for tp in rewind:
                await self.seek(tp, earliest[tp])
            self.log.info(
                "never committed, read from the beginning: %s",
                ", ".join(f"{tp.topic}[{tp.partition}]@{earliest[tp]}" for tp in rewind),
            )


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as the Java client and
    aiokafka) gives a keyed record: where the gateway put the job's image event."""
    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


class CommitGate:
    """Keeps offset commits (transaction commits, exactly-once) out of a unit of work.

    Agents hold it from a unit's first send to its last table write; the consumer takes
    it before each commit. Holders never wait for a commit, so holding it cannot
    deadlock: a commit just waits for the batch in hand.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    @property
    def held(self) -> bool:
        return self._lock.locked()


class PartitionTransactions(TransactionManager):
    """Faust's transaction manager, sending each record in the transaction of its key's
    partition (see the module docstring, exactly-once 1)."""

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> Awaitable[RecordMetadata]:
        if partition is None:
            if key is None:
                raise ValueError(f"exactly-once: a record for {topic} needs a key or partition")
            partition = key_partition(key, self.app.conf.topic_partitions)
        group = self._group_for(topic)
        transactional_id = f"{self.app.conf.id}-{group}-{partition}"
        return await self.producer.send(
            topic, key, value, partition, timestamp, headers, transactional_id=transactional_id
        )

    def _group_for(self, topic: str) -> int:
        """The topic's copartitioned group; a topic no worker reads (captions, job
        state) goes with the images topic, whose offsets commit the job's work."""
        assignor = self.app.assignor
        try:
            return int(assignor.group_for_topic(topic))
        except KeyError:
            return int(assignor.group_for_topic(TOPICS.images.name))


class ChangelogWriter(Protocol):
    async def changelog_written(self) -> None: ...


class UnitOfWork:
    """One batch's (or control request's) work, kept whole between two commits.

    Under exactly-once (a `gate`) it holds the `CommitGate` from its first send until
    its table writes are on the log: they reach Kafka later, through Faust's send
    buffer (exactly-once 2). Without a gate there is nothing to hold.
    """

    def __init__(self, gate: CommitGate | None, tables: Sequence[ChangelogWriter]) -> None:
        self.gate = gate
        self.tables = tables

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        if self.gate is None:
            yield
            return
        async with self.gate.hold():
            yield
            for table in self.tables:
                await table.changelog_written()


def gated_consumer(
    base: type[faust_aiokafka.Consumer], gate: CommitGate
) -> type[faust_aiokafka.Consumer]:
    """`base` committing only while no agent holds `gate` (exactly-once 2)."""

    class GatedConsumer(base):  # type: ignore[valid-type,misc]
        async def _commit_offsets(
            self, offsets: Mapping[TP, int], start_new_transaction: bool = True
        ) -> bool:
            async with gate.hold():
                return bool(await super()._commit_offsets(offsets, start_new_transaction))

    return GatedConsumer


def transport_for(
    kafka: KafkaConnection, gate: CommitGate | None = None
) -> type[faust_aiokafka.Transport]:
    """The profile's `kafka://` transport class with a `RewindingConsumer`; with a
    `gate`, the exactly-once consumer and transaction manager."""
    base = kafka.faust_transport()

    class ProfileRewindingConsumer(RewindingConsumer, base.Consumer):  # type: ignore[misc,name-defined]
        pass

    consumer: type[faust_aiokafka.Consumer] = ProfileRewindingConsumer
    if gate is not None:
        consumer = gated_consumer(consumer, gate)

    class Transport(base):  # type: ignore[misc,valid-type]
        Consumer = consumer
        TransactionManager = PartitionTransactions

    return Transport


def use_transport(app: Any, kafka: KafkaConnection, gate: CommitGate | None = None) -> None:
    """Give `app` (a `faust.App`, before it made its transport) the profile's transport."""
    app.transport = transport_for(kafka, gate)(app.conf.broker_consumer, app)


class WriteTrackingTable(faust.Table[Any, Any]):
    """A Faust table that can wait until its changelog writes so far are on the log."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unwritten: list[asyncio.Future[Any]] = []

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        if self.app.in_transaction:  # only exactly-once workers wait (and keep them)
            self._unwritten.append(fut)
        return fut

    async def changelog_written(self) -> None:
        """Return once every changelog record sent so far is written (in the open
        transaction, under exactly-once); raise if one could not be."""
        while self._unwritten:
            pending, self._unwritten = self._unwritten, []
            await asyncio.gather(*pending)


def forget_partitions(data: MutableMapping[Any, Any], revoked: set[int], partitions: int) -> int:
    """Drop the keys of `revoked` partitions from an in-memory table; how many went."""
    gone = [key for key in data if key_partition(key, partitions) in revoked]
    for key in gone:
        del data[key]
    return len(gone)


class FlowSafeRecovery(Recovery):
    """Faust's table recovery, with the consumer's flow stopped while the stream
    partitions are resumed and sought (see the module docstring)."""

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        self.app.consumer.stop_flow()
        await super().on_recovery_completed(generation_id)

    async def _resume_streams(self, generation_id: int = 0) -> None:
        self.app.consumer.stop_flow()
        await super()._resume_streams(generation_id)


class FlowSafeTableManager(TableManager):
    """Faust's table manager with `FlowSafeRecovery`; given as `faust.App(TableManager=)`.

    Under exactly-once its tables are in memory, and a partition the worker loses is
    forgotten (exactly-once 3): it may hold writes of a transaction the next owner aborts,
    and if the partition comes back it is recovered from the committed changelog.
    """

    async def on_rebalance(
        self,
        assigned: set[TP],
        revoked: set[TP],
        newly_assigned: set[TP],
        generation_id: int = 0,
    ) -> None:
        if self.app.in_transaction and revoked:
            for table in self.values():
                lost = {tp.partition for tp in revoked if tp.topic == table.changelog_topic_name}
                data = getattr(table.data, "data", None)
                if lost and isinstance(data, MutableMapping):
                    forget_partitions(
                        data, lost, table.partitions or self.app.conf.topic_partitions
                    )
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = FlowSafeRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
