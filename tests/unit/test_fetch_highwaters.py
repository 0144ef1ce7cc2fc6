"""The worker's Faust transport per profile (captionstream/kafka/faust_transport.py, which
processor/transport.py builds on): end offsets from fetch responses on the embedded
broker, an idempotent producer on Kafka. Wiring only, no broker."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

import captionstream.kafka.faust_transport
from captionstream.ingest.blobstore import LocalBlobStore
from captionstream.kafka import EMBEDDED_PROFILE, KAFKA_PROFILE, KafkaConnection
from captionstream.kafka.faust_transport import (
    FetchHighwatersConsumerThread,
    IdempotentProducer,
    ListOffsetsConsumerThread,
)
from captionstream.processor.app import create_app
from captionstream.processor.inference import InferenceThread
from captionstream.processor.transport import PartitionTransactions
from captionstream.settings import KafkaProfile, ProcessorSettings


def test_only_the_embedded_profile_reads_end_offsets_from_fetches() -> None:
    assert EMBEDDED_PROFILE.highwaters_from_fetch
    assert not KAFKA_PROFILE.highwaters_from_fetch


async def test_highwaters_come_from_fetch_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[KafkaConnection, list[TopicPartition]]] = []

    async def fake_fetch_highwaters(
        kafka: KafkaConnection, tps: Collection[TopicPartition], timeout_s: float = 30
    ) -> dict[TopicPartition, int]:
        asked.append((kafka, list(tps)))
        return {tp: 100 + tp.partition for tp in tps}

    monkeypatch.setattr(
        captionstream.kafka.faust_transport, "fetch_highwaters", fake_fetch_highwaters
    )
    kafka = KafkaConnection("127.0.0.1:9555,other:9092", KafkaProfile.EMBEDDED)
    thread: Any = SimpleNamespace(consumer=SimpleNamespace(in_transaction=False), kafka=kafka)
    tps = [TP("jobs-changelog", 0), TP("jobs-changelog", 3)]
    ends = await FetchHighwatersConsumerThread._highwaters(thread, tps)
    assert ends == {tps[0]: 100, tps[1]: 103}
    assert all(isinstance(tp, TP) for tp in ends)  # Faust's own type, as Faust keys by it
    assert asked == [
        (kafka, [TopicPartition("jobs-changelog", 0), TopicPartition("jobs-changelog", 3)])
    ]


@pytest.mark.parametrize("in_transaction", [False, True])
async def test_on_kafka_end_offsets_come_from_the_broker(in_transaction: bool) -> None:
    """Not from the fetch state: under exactly-once Faust read last_stable_offset() there,
    None (-1) for a changelog partition just assigned, and recovery crashed."""
    asked: list[list[TP]] = []

    class Consumer:
        async def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
            asked.append(tps)
            return {tp: 40 + tp.partition for tp in tps}

    kafka = KafkaConnection("127.0.0.1:9555", KafkaProfile.KAFKA)
    thread: Any = SimpleNamespace(
        consumer=SimpleNamespace(in_transaction=in_transaction),
        kafka=kafka,
        _ensure_consumer=Consumer,
    )
    tps = [TP("jobs-changelog", 1), TP("jobs-changelog", 2)]
    assert await ListOffsetsConsumerThread._highwaters(thread, tps) == {tps[0]: 41, tps[1]: 42}
    assert asked == [tps]


def worker_app(settings: ProcessorSettings, tmp_path: Path) -> Any:
    """The worker's Faust app as `processor.worker` wires it (nothing is started)."""
    kafka = KafkaConnection.from_settings(settings, "processor")
    captioner: Any = SimpleNamespace(name="fake")
    return create_app(
        settings,
        captioner,
        LocalBlobStore(tmp_path / "blobs"),
        tmp_path / "state",
        InferenceThread(),
        kafka,
    ).app


@pytest.mark.parametrize(("profile", "idempotent"), [("embedded", False), ("kafka", True)])
def test_worker_transport_follows_the_profile(
    profile: str, idempotent: bool, tmp_path: Path
) -> None:
    settings = ProcessorSettings(kafka_bootstrap="127.0.0.1:9555", kafka_profile=profile)
    app = worker_app(settings, tmp_path)
    assert issubclass(app.transport.Consumer, faust_aiokafka.Consumer)
    assert app.conf.processing_guarantee.value == "at_least_once"
    assert app.conf.table_standby_replicas == 1
    extra = app.producer._settings_extra()
    assert (extra.get("enable_idempotence") is True) is idempotent
    assert isinstance(app.producer, IdempotentProducer) is idempotent
    assert app.conf.topic_allow_declare is False


def test_exactly_once_worker_wiring(tmp_path: Path) -> None:
    settings = ProcessorSettings(
        kafka_bootstrap="127.0.0.1:9555",
        kafka_profile="kafka",
        processing_guarantee="exactly_once",
    )
    app = worker_app(settings, tmp_path)
    assert app.conf.processing_guarantee.value == "exactly_once"
    assert str(app.conf.store) == "memory:"
    assert app.conf.table_standby_replicas == 0
    assert app.transport.TransactionManager is PartitionTransactions
    assert app.transport.Consumer.__name__ == "GatedConsumer"
