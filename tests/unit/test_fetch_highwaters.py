"""The worker's Faust transport per profile (processor/transport.py): end offsets from
fetch responses on the embedded broker, an idempotent producer on Kafka. Wiring only, no
broker."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

import processor.transport
from captionstream.kafka import EMBEDDED_PROFILE, KAFKA_PROFILE, KafkaConnection
from captionstream.settings import KafkaProfile, ProcessorSettings
from ingest.blobstore import LocalBlobStore
from processor.app import create_app
from processor.inference import InferenceThread
from processor.transport import FetchHighwaterConsumerThread, IdempotentProducer


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

    monkeypatch.setattr(processor.transport, "fetch_highwaters", fake_fetch_highwaters)
    kafka = KafkaConnection("127.0.0.1:9555,other:9092", KafkaProfile.EMBEDDED)
    thread: Any = SimpleNamespace(consumer=SimpleNamespace(in_transaction=False), kafka=kafka)
    tps = [TP("jobs-changelog", 0), TP("jobs-changelog", 3)]
    ends = await FetchHighwaterConsumerThread._highwaters(thread, tps)
    assert ends == {tps[0]: 100, tps[1]: 103}
    assert all(isinstance(tp, TP) for tp in ends)  # Faust's own type, as Faust keys by it
    assert asked == [
        (kafka, [TopicPartition("jobs-changelog", 0), TopicPartition("jobs-changelog", 3)])
    ]


@pytest.mark.parametrize(
    ("profile", "fetching", "idempotent"), [("embedded", True, False), ("kafka", False, True)]
)
def test_worker_transport_follows_the_profile(
    profile: str, fetching: bool, idempotent: bool, tmp_path: Path
) -> None:
    settings = ProcessorSettings(kafka_bootstrap="127.0.0.1:9555", kafka_profile=profile)
    kafka = KafkaConnection.from_settings(settings, "processor")
    captioner: Any = SimpleNamespace(name="fake")
    app = create_app(
        settings,
        captioner,
        LocalBlobStore(tmp_path / "blobs"),
        tmp_path / "state",
        InferenceThread(),
        kafka,
    ).app
    assert (app.transport.Consumer is not faust_aiokafka.Consumer) is fetching
    extra = app.producer._settings_extra()
    assert (extra.get("enable_idempotence") is True) is idempotent
    assert isinstance(app.producer, IdempotentProducer) is idempotent
    assert app.conf.topic_allow_declare is False
