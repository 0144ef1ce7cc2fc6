"""Local table state that its changelog no longer backs is discarded before the worker starts.

A worker keeps its Faust tables in RocksDB under its data directory, one database per
changelog partition, each remembering the offset of the last changelog record it applied.
The changelog is the truth; the local copy only saves reading it again. When the two
disagree, Faust's recovery either crashes (`ConsistencyError`: persisted offset above the
changelog's end) or, worse, carries on with rows the changelog never had.

That happens whenever the broker's copy goes and the worker's stays:
- `make run`, Ctrl-C, `make run`: the embedded broker keeps topics in memory, the data
  directory keeps the worker's tables;
- on any Kafka, when the changelog topics are deleted and recreated, or the worker is
  pointed at another cluster with the same data directory.

So before joining the group, each local partition is checked against its changelog, as
Kafka Streams does with a stale state store: if the persisted offset is at or past the
changelog's end, or the record at that offset is not what the local store holds for its
key (another incarnation of the topic), the partition's database is deleted and Faust
rebuilds it from the changelog. Discarding is always safe (the changelog is the truth), so
a doubtful partition is discarded, never kept.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiokafka import TopicPartition

from captionstream.kafka import KafkaConnection, fetch_highwaters, list_topics, read_record_at

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChangelogRecord:
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone (the key was deleted)


class ChangelogReader(Protocol):
    """What the check needs from Kafka (real: `captionstream.kafka`; tests: a fake)."""

    async def end_offsets(self, tps: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        """The offset the next record of each partition will get."""
        ...

    async def record_at(self, tp: TopicPartition, offset: int) -> ChangelogRecord | None:
        """The first record at or after `offset` (compaction may have removed it)."""
        ...


def stale_reason(
    persisted: int,
    end: int,
    record: ChangelogRecord | None,
    local_value: bytes | None,
) -> str | None:
    """Why a local partition that applied changelog records up to `persisted` cannot be
    trusted, or None when it can.

    `record` is the changelog's first record at or after `persisted`, and `local_value`
    what the local store holds for that record's key.
    """
    if persisted >= end:
        return f"it applied changelog offset {persisted}, the changelog ends at {end}"
    if record is None or record.offset != persisted:
        return None  # compacted away: nothing to compare, the offsets agree
    if record.value != local_value:
        return (
            f"the changelog record at offset {persisted} differs from the local state "
            "(a recreated topic or another cluster)"
        )
    return None


@dataclass(frozen=True, slots=True)
class LocalPartition:
    """One table partition's RocksDB database in the worker's data directory."""

    table: str
    tp: TopicPartition
    path: Path
    store: Any  # faust.stores.rocksdb.Store: opens the database the way Faust does


def local_partitions(app: Any, partitions: int) -> Iterator[LocalPartition]:
    """The table partitions of `app` (a `faust.App`) that have a database on disk (none
    for tables in memory: exactly-once workers)."""
    for table in app.tables.values():
        store = table.data
        if not hasattr(store, "partition_path"):
            continue
        topic = table.changelog_topic.get_topic_name()
        for partition in range(partitions):
            path = Path(store.partition_path(partition))
            if path.exists():
                yield LocalPartition(table.name, TopicPartition(topic, partition), path, store)


def _read(part: LocalPartition, key: bytes | None) -> tuple[int | None, bytes | None]:
    """(persisted offset, the local value of `key`) from the partition's database."""
    db = part.store.rocksdb_options.open(part.path)
    try:
        raw = db.get(part.store.offset_key)
        value = None if key is None else db.get(key)
        return (None if raw is None else int(raw)), value
    finally:
        db.close()


async def discard_stale_table_state(
    app: Any, partitions: int, reader: ChangelogReader
) -> list[LocalPartition]:
    """Delete the local databases their changelog does not back (see the module's
    docstring); return them. Call before the worker starts: nothing may hold them open."""
    persisted: dict[TopicPartition, tuple[LocalPartition, int]] = {}
    for part in local_partitions(app, partitions):
        offset, _ = _read(part, None)
        if offset is not None:
            persisted[part.tp] = (part, offset)
    if not persisted:
        return []
    ends = await reader.end_offsets(list(persisted))
    stale: list[tuple[LocalPartition, str]] = []
    for tp, (part, offset) in sorted(persisted.items()):
        end = ends.get(tp, 0)
        record = await reader.record_at(tp, offset) if offset < end else None
        local_value = None
        if record is not None and record.offset == offset:
            _, local_value = _read(part, record.key)
        reason = stale_reason(offset, end, record, local_value)
        if reason is not None:
            stale.append((part, reason))
    if stale:
        log.warning(
            "discarding local table state its changelog does not back, to rebuild it from "
            "the changelog: %s",
            "; ".join(f"{p.table} partition {p.tp.partition} ({why})" for p, why in stale),
        )
    for part, _ in stale:
        shutil.rmtree(part.path)
    return [part for part, _ in stale]


class KafkaChangelogReader:
    """`ChangelogReader` on a real broker. End offsets come from fetch responses, which
    every broker gets right (ListOffsets is wrong on the embedded one: `fetch_highwaters`)."""

    def __init__(self, kafka: KafkaConnection) -> None:
        self.kafka = kafka

    async def end_offsets(self, tps: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        """A topic that does not exist (yet) ends at 0: Faust creates it empty."""
        existing = await list_topics(self.kafka)
        ends = await fetch_highwaters(self.kafka, [tp for tp in tps if tp.topic in existing])
        return {tp: ends.get(tp, 0) for tp in tps}

    async def record_at(self, tp: TopicPartition, offset: int) -> ChangelogRecord | None:
        record = await read_record_at(self.kafka, tp, offset)
        if record is None:
            return None
        return ChangelogRecord(record.offset, record.key, record.value)
