"""Local table state its changelog does not back is discarded: the decision as a plain
function, and the deletion on real RocksDB databases of a real Faust app (the changelog
is a fake here; tests/integration/test_cli.py runs the whole thing on a real broker)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka import TopicPartition

from captionstream.processor.app import ROCKSDB_OPTIONS
from captionstream.processor.table_state import (
    ChangelogRecord,
    discard_stale_table_state,
    local_partitions,
    stale_reason,
)

CHANGELOG = "t-jobs-changelog"


def test_state_at_or_past_the_changelog_end_is_stale() -> None:
    assert stale_reason(1, 0, None, None) is not None  # the broker lost the topic
    assert stale_reason(0, 0, None, None) is not None  # one record applied, none there
    assert stale_reason(7, 7, None, None) is not None


def test_state_whose_last_record_is_there_and_matches_is_kept() -> None:
    record = ChangelogRecord(3, b"job", b"SUCCESS")
    assert stale_reason(3, 10, record, b"SUCCESS") is None


def test_state_whose_last_record_differs_is_another_incarnation() -> None:
    record = ChangelogRecord(3, b"job", b"PENDING")
    reason = stale_reason(3, 10, record, b"SUCCESS")
    assert reason is not None
    assert "differs" in reason
    # A tombstone in the changelog where the local store holds the key is a mismatch too.
    assert stale_reason(3, 10, ChangelogRecord(3, b"job", None), b"SUCCESS") is not None


def test_compacted_away_record_gives_nothing_to_compare() -> None:
    assert stale_reason(3, 10, ChangelogRecord(5, b"other", b"x"), None) is None
    assert stale_reason(3, 10, None, None) is None


class FakeChangelog:
    def __init__(self, ends: dict[int, int], records: dict[int, ChangelogRecord]) -> None:
        self.ends = ends
        self.records = records
        self.asked: list[tuple[int, int]] = []

    async def end_offsets(self, tps: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        return {tp: self.ends[tp.partition] for tp in tps}

    async def record_at(self, tp: TopicPartition, offset: int) -> ChangelogRecord | None:
        self.asked.append((tp.partition, offset))
        return self.records.get(tp.partition)


def faust_app(datadir: Path) -> tuple[faust.App, Any]:
    app = faust.App("t", store="rocksdb://", datadir=str(datadir))
    table = app.Table(
        "jobs",
        default=None,
        partitions=3,
        key_type=bytes,
        value_type=bytes,
        options=dict(ROCKSDB_OPTIONS),
    )
    return app, table


def write_partition(table: Any, partition: int, rows: dict[bytes, bytes], offset: int) -> None:
    """What a worker leaves behind: rows and the offset of the last record it applied."""
    store = table.data
    db = store.rocksdb_options.open(store.partition_path(partition))
    try:
        for key, value in rows.items():
            db.put(key, value)
        db.put(store.offset_key, str(offset).encode())
    finally:
        db.close()


async def test_only_partitions_the_changelog_does_not_back_are_deleted(tmp_path: Path) -> None:
    app, table = faust_app(tmp_path)
    write_partition(table, 0, {b"a": b"SUCCESS"}, offset=4)  # changelog lost: ends at 0
    write_partition(table, 1, {b"b": b"SUCCESS"}, offset=2)  # matches its changelog
    write_partition(table, 2, {b"c": b"SUCCESS"}, offset=1)  # another topic incarnation
    changelog = FakeChangelog(
        ends={0: 0, 1: 3, 2: 5},
        records={1: ChangelogRecord(2, b"b", b"SUCCESS"), 2: ChangelogRecord(1, b"z", b"x")},
    )
    paths = {p.tp.partition: p.path for p in local_partitions(app, 3)}
    assert set(paths) == {0, 1, 2}
    assert {p.tp.topic for p in local_partitions(app, 3)} == {CHANGELOG}

    discarded = await discard_stale_table_state(app, 3, changelog)

    assert sorted(p.tp.partition for p in discarded) == [0, 2]
    assert not paths[0].exists()
    assert paths[1].exists()
    assert not paths[2].exists()
    assert changelog.asked == [(1, 2), (2, 1)], "past the end, no record is read"
    # What is kept still opens with its rows.
    db = table.data.rocksdb_options.open(paths[1])
    try:
        assert db.get(b"b") == b"SUCCESS"
    finally:
        db.close()


async def test_a_fresh_worker_has_nothing_to_check(tmp_path: Path) -> None:
    app, _ = faust_app(tmp_path)
    changelog = FakeChangelog(ends={}, records={})
    assert await discard_stale_table_state(app, 3, changelog) == []
    assert changelog.asked == []


async def test_one_warning_names_every_discarded_partition(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, table = faust_app(tmp_path)
    write_partition(table, 0, {b"a": b"x"}, offset=1)
    write_partition(table, 2, {b"c": b"x"}, offset=0)
    with caplog.at_level("WARNING", logger="captionstream.processor.table_state"):
        await discard_stale_table_state(app, 3, FakeChangelog({0: 0, 2: 0}, {}))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "jobs partition 0" in warnings[0]
    assert "jobs partition 2" in warnings[0]
