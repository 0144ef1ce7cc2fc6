"""Which offsets of the job-state topic the webhook dispatcher may commit: everything
below a partition's lowest record whose webhook is still being delivered."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class PartitionOffsets:
    """Offsets of one assigned partition: records fetched, and those whose webhook is
    still being delivered. Everything below `committable` is finished."""

    next_offset: int | None = None  # after the last record fetched
    pending: set[int] = field(default_factory=set)
    committed: int | None = None

    def fetched(self, offset: int, deliver: bool) -> None:
        self.next_offset = offset + 1
        if deliver:
            self.pending.add(offset)

    def finished(self, offset: int) -> None:
        self.pending.discard(offset)

    @property
    def committable(self) -> int | None:
        if self.pending:
            return min(self.pending)
        return self.next_offset

    def to_commit(self) -> int | None:
        """The offset to commit now, if it moved since the last commit."""
        offset = self.committable
        if offset is None or offset == self.committed:
            return None
        return offset


class OffsetTracker:
    """`PartitionOffsets` per assigned partition. A partition's object is replaced when
    it is revoked, so a delivery that outlives its assignment cannot touch the next one."""

    def __init__(self) -> None:
        self.partitions: dict[TopicPartition, PartitionOffsets] = {}

    def partition(self, tp: TopicPartition) -> PartitionOffsets:
        return self.partitions.setdefault(tp, PartitionOffsets())

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.partitions.pop(tp, None)

    def to_commit(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        chosen = self.partitions if tps is None else {tp: None for tp in tps}
        commits = {}
        for tp in chosen:
            offsets = self.partitions.get(tp)
            offset = None if offsets is None else offsets.to_commit()
            if offset is not None:
                commits[tp] = offset
        return commits

    def committed(self, commits: dict[TopicPartition, int]) -> None:
        for tp, offset in commits.items():
            if tp in self.partitions:
                self.partitions[tp].committed = offset
