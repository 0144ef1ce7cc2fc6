"""The parts of exactly-once processing that need no broker: which transaction a record
goes in, when commits may run, what a worker forgets, and where it is refused.

End to end (a worker SIGKILLed mid-batch on a 3-node Apache Kafka, one caption event
per job for a read_committed reader): tests/integration/test_broker_faults.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP

from captionstream.cli import build_parser, cmd_topics
from captionstream.errors import ConfigurationError
from captionstream.kafka import KafkaConnection, readable_end
from captionstream.processor.transport import (
    CommitGate,
    forget_partitions,
    gated_consumer,
    key_partition,
    never_committed,
)
from captionstream.processor.worker import refuse_unsupported_guarantee
from captionstream.settings import KafkaProfile, ProcessingGuarantee, ProcessorSettings


@pytest.mark.parametrize("partitions", [1, 3, 8, 12])
def test_key_partition_is_where_the_default_partitioner_puts_the_job(partitions: int) -> None:
    partitioner = DefaultPartitioner()
    every = list(range(partitions))
    for i in range(500):
        key = f"job-{i:04x}".encode()
        assert key_partition(key, partitions) == partitioner(key, every, every)


def test_forget_partitions_drops_exactly_the_lost_partitions_keys() -> None:
    keys = [f"job-{i}".encode() for i in range(200)]
    data: dict[Any, Any] = {key: b"state" for key in keys}
    gone = forget_partitions(data, {1, 3}, 4)
    assert gone == sum(key_partition(k, 4) in {1, 3} for k in keys)
    assert 0 < gone < len(keys)
    assert sorted(data) == sorted(k for k in keys if key_partition(k, 4) in {0, 2})


class RecordingConsumer:
    """Stands in for Faust's consumer: records when a commit ran."""

    def __init__(self) -> None:
        self.commits: list[Mapping[Any, int]] = []

    async def _commit_offsets(
        self, offsets: Mapping[Any, int], start_new_transaction: bool = True
    ) -> bool:
        self.commits.append(offsets)
        return True


async def test_a_commit_waits_for_the_unit_of_work_in_hand() -> None:
    gate = CommitGate()
    consumer: Any = gated_consumer(RecordingConsumer, gate)()  # type: ignore[arg-type]
    order: list[str] = []
    batch_started = asyncio.Event()
    release = asyncio.Event()

    async def batch() -> None:
        async with gate.hold():
            batch_started.set()
            order.append("caption sent")
            await release.wait()
            order.append("table written")

    async def commit() -> None:
        await consumer._commit_offsets({TP("images", 0): 9})
        order.append("committed")

    batching = asyncio.create_task(batch())
    await batch_started.wait()
    committing = asyncio.create_task(commit())
    await asyncio.sleep(0.05)
    assert gate.held
    assert order == ["caption sent"], "no commit while a batch is half written"
    release.set()
    await asyncio.gather(batching, committing)
    assert order == ["caption sent", "table written", "committed"]
    assert consumer.commits == [{TP("images", 0): 9}]


def processor_settings(profile: KafkaProfile, guarantee: ProcessingGuarantee) -> ProcessorSettings:
    return ProcessorSettings(
        kafka_bootstrap="127.0.0.1:9092", kafka_profile=profile, processing_guarantee=guarantee
    )


def test_exactly_once_is_refused_on_the_embedded_broker_with_the_reason() -> None:
    settings = processor_settings(KafkaProfile.EMBEDDED, ProcessingGuarantee.EXACTLY_ONCE)
    with pytest.raises(ConfigurationError) as refused:
        refuse_unsupported_guarantee(settings)
    message = str(refused.value)
    assert "CAPTIONSTREAM_PROCESSING_GUARANTEE=exactly_once" in message
    assert "transactions" in message
    assert "CAPTIONSTREAM_KAFKA_PROFILE=kafka" in message


@pytest.mark.parametrize(
    ("profile", "guarantee"),
    [
        (KafkaProfile.KAFKA, ProcessingGuarantee.EXACTLY_ONCE),
        (KafkaProfile.KAFKA, ProcessingGuarantee.AT_LEAST_ONCE),
        (KafkaProfile.EMBEDDED, ProcessingGuarantee.AT_LEAST_ONCE),
    ],
)
def test_supported_guarantees_start(profile: KafkaProfile, guarantee: ProcessingGuarantee) -> None:
    refuse_unsupported_guarantee(processor_settings(profile, guarantee))


def test_the_guarantee_is_read_from_its_prefixed_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_PROCESSING_GUARANTEE", "exactly_once")
    assert ProcessorSettings().processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
    monkeypatch.setenv("CAPTIONSTREAM_PROCESSING_GUARANTEE", "twice")
    with pytest.raises(ValueError, match="at_least_once"):
        ProcessorSettings()


def test_readers_read_committed_where_transactions_exist() -> None:
    assert KafkaConnection("k:9092", KafkaProfile.KAFKA).isolation_level == "read_committed"
    assert KafkaConnection("k:9092", KafkaProfile.EMBEDDED).isolation_level == "read_uncommitted"


class FetchedConsumer:
    """What a consumer knows from its last fetch response."""

    def __init__(self, highwater: int | None, lso: int | None) -> None:
        self._highwater = highwater
        self._lso = lso

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._highwater

    def last_stable_offset(self, tp: TopicPartition) -> int | None:
        return self._lso


@pytest.mark.parametrize(
    ("highwater", "lso", "end"),
    [
        (120, 100, 100),  # read_committed, a transaction open from 100: readable to 100
        (120, -1, 120),  # read_uncommitted: aiokafka reports lso -1
        (120, None, 120),  # a broker too old to report one
        (None, None, None),  # no fetch response yet
    ],
)
def test_readable_end(highwater: int | None, lso: int | None, end: int | None) -> None:
    consumer: Any = FetchedConsumer(highwater, lso)
    assert readable_end(consumer, TopicPartition("t", 0)) == end


@pytest.mark.parametrize("guarantee", list(ProcessingGuarantee))
def test_topics_lists_transactional_ids_for_exactly_once_workers(
    guarantee: ProcessingGuarantee,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_PROCESSING_GUARANTEE", guarantee.value)
    monkeypatch.setenv("CAPTIONSTREAM_GROUP_ID", "proc")
    assert cmd_topics(build_parser().parse_args(["topics"])) == 0
    printed = "TRANSACTIONAL_ID proc (PREFIXED): DESCRIBE, WRITE" in capsys.readouterr().out
    assert printed is (guarantee is ProcessingGuarantee.EXACTLY_ONCE)


def test_never_committed_stream_partitions_are_rewound_not_changelogs() -> None:
    assigned = [
        TP("images", 0),
        TP("images", 1),
        TP("images", 2),
        TP("jobs-changelog", 1),
    ]
    committed: dict[TP, int | None] = {TP("images", 0): 57, TP("images", 2): None}
    assert never_committed(assigned, committed, ["jobs-changelog"]) == [
        TP("images", 1),
        TP("images", 2),
    ]
