"""The embedded profile's end offsets from fetch responses (captionstream/kafka.py,
`ClientTuning.highwaters_from_fetch`; processor/tansu.py): wiring only, no broker."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from faust.types import TP
from yarl import URL

import processor.tansu
from captionstream.kafka import EMBEDDED_PROFILE, KAFKA_PROFILE
from captionstream.settings import ProcessorSettings
from ingest.blobstore import LocalBlobStore
from processor.app import create_app
from processor.inference import InferenceThread
from processor.tansu import FetchHighwaterConsumerThread, FetchHighwaterTransport


def test_only_the_embedded_profile_reads_end_offsets_from_fetches() -> None:
    assert EMBEDDED_PROFILE.highwaters_from_fetch
    assert not KAFKA_PROFILE.highwaters_from_fetch


async def test_highwaters_come_from_fetch_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, list[TopicPartition]]] = []

    async def fake_fetch_highwaters(
        bootstrap: str, tps: Collection[TopicPartition], timeout_s: float = 30
    ) -> dict[TopicPartition, int]:
        asked.append((bootstrap, list(tps)))
        return {tp: 100 + tp.partition for tp in tps}

    monkeypatch.setattr(processor.tansu, "fetch_highwaters", fake_fetch_highwaters)
    thread: Any = SimpleNamespace(
        consumer=SimpleNamespace(in_transaction=False),
        transport=SimpleNamespace(url=[URL("kafka://127.0.0.1:9555"), URL("kafka://other")]),
    )
    tps = [TP("jobs-changelog", 0), TP("jobs-changelog", 3)]
    ends = await FetchHighwaterConsumerThread._highwaters(thread, tps)
    assert ends == {tps[0]: 100, tps[1]: 103}
    assert all(isinstance(tp, TP) for tp in ends)  # Faust's own type, as Faust keys by it
    assert asked == [
        (
            "127.0.0.1:9555,other:9092",
            [TopicPartition("jobs-changelog", 0), TopicPartition("jobs-changelog", 3)],
        )
    ]


@pytest.mark.parametrize(("profile", "fetching"), [("embedded", True), ("kafka", False)])
def test_worker_transport_follows_the_profile(
    profile: str, fetching: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9555")
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_PROFILE", profile)
    captioner: Any = SimpleNamespace(name="fake")
    app = create_app(
        ProcessorSettings(),
        captioner,
        LocalBlobStore(tmp_path / "blobs"),
        tmp_path / "state",
        InferenceThread(),
    ).app
    assert isinstance(app.transport, FetchHighwaterTransport) is fetching
