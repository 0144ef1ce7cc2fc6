"""How the worker's transport is put together (processor.transport on the profile's
`KafkaConnection.faust_transport`), and its unit of work. No broker: nothing starts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka

from captionstream.ingest.blobstore import LocalBlobStore
from captionstream.kafka import KafkaConnection
from captionstream.kafka.faust_transport import (
    FetchHighwatersConsumerThread,
    IdempotentProducer,
    ListOffsetsConsumerThread,
)
from captionstream.processor.app import create_app
from captionstream.processor.inference import InferenceThread
from captionstream.processor.transport import (
    CommitGate,
    RewindingConsumer,
    UnitOfWork,
    transport_for,
)
from captionstream.settings import KafkaProfile, ProcessorSettings


@pytest.mark.parametrize(
    ("profile", "thread", "producer"),
    [
        (KafkaProfile.EMBEDDED, FetchHighwatersConsumerThread, faust_aiokafka.Producer),
        (KafkaProfile.KAFKA, ListOffsetsConsumerThread, IdempotentProducer),
    ],
)
def test_the_profile_picks_its_transport(
    profile: KafkaProfile, thread: type[Any], producer: type[Any], tmp_path: Path
) -> None:
    settings = ProcessorSettings(kafka_bootstrap="127.0.0.1:9555", kafka_profile=profile.value)
    kafka = KafkaConnection.from_settings(settings, "processor")
    base = kafka.faust_transport()
    assert base.Producer is producer
    app = create_app(
        settings,
        SimpleNamespace(name="fake"),  # type: ignore[arg-type]
        LocalBlobStore(tmp_path / "blobs"),
        tmp_path / "state",
        InferenceThread(),
        kafka,
    ).app
    consumer = app.consumer
    assert isinstance(consumer, RewindingConsumer)
    assert isinstance(consumer._thread, thread)
    if thread is FetchHighwatersConsumerThread:
        assert consumer._thread.kafka is kafka, "fetches go to the worker's own cluster"
    assert type(app.producer) is producer


def test_exactly_once_gates_the_profile_consumer() -> None:
    kafka = KafkaConnection("127.0.0.1:9092", KafkaProfile.KAFKA)
    consumer = transport_for(kafka, CommitGate()).Consumer
    assert consumer.__name__ == "GatedConsumer"
    assert issubclass(consumer, RewindingConsumer)
    assert issubclass(transport_for(kafka).Consumer, RewindingConsumer)
    assert transport_for(kafka).Consumer.__name__ != "GatedConsumer"


class RecordingTable:
    def __init__(self, name: str, gate: CommitGate, log: list[str]) -> None:
        self.name, self.gate, self.log = name, gate, log

    async def changelog_written(self) -> None:
        await asyncio.sleep(0)
        self.log.append(f"{self.name} written, gate held: {self.gate.held}")


async def test_a_unit_of_work_holds_the_gate_until_its_table_writes_are_on_the_log() -> None:
    gate, log = CommitGate(), []
    unit = UnitOfWork(gate, [RecordingTable("jobs", gate, log), RecordingTable("c", gate, log)])
    async with unit():
        log.append(f"work, gate held: {gate.held}")
    assert log == [
        "work, gate held: True",
        "jobs written, gate held: True",
        "c written, gate held: True",
    ]
    assert not gate.held


async def test_a_commit_waits_for_the_unit_in_hand() -> None:
    gate = CommitGate()
    unit = UnitOfWork(gate, [])
    order: list[str] = []

    async def commit() -> None:
        async with gate.hold():
            order.append("commit")

    async with unit():
        task = asyncio.create_task(commit())
        await asyncio.sleep(0.01)
        order.append("unit done")
    await task
    assert order == ["unit done", "commit"]


async def test_without_a_gate_a_unit_of_work_waits_for_nothing() -> None:
    class Unwritable:
        async def changelog_written(self) -> None:
            raise AssertionError("at-least-once workers never wait for their changelog")

    async with UnitOfWork(None, [Unwritable()])():
        pass
