"""Settings from the environment, and the Kafka client tuning each profile selects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captionstream.kafka import EMBEDDED_PROFILE, KAFKA_PROFILE, topic_config, tuning_for
from captionstream.settings import (
    EMBEDDED_BOOTSTRAP,
    CommonSettings,
    GatewaySettings,
    KafkaProfile,
    ProcessorSettings,
)
from schemas.topics import TOPICS


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CAPTIONSTREAM_"):
            monkeypatch.delenv(name)


def test_defaults_use_the_embedded_broker() -> None:
    settings = CommonSettings()
    assert settings.kafka_bootstrap is None
    assert settings.bootstrap == EMBEDDED_BOOTSTRAP == "127.0.0.1:9092"
    assert settings.profile is KafkaProfile.EMBEDDED


def test_bootstrap_set_selects_the_kafka_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    settings = CommonSettings()
    assert settings.bootstrap == "kafka-1:9092,kafka-2:9092"
    assert settings.profile is KafkaProfile.KAFKA


def test_explicit_profile_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_PROFILE", "embedded")
    settings = CommonSettings()
    assert settings.bootstrap == "127.0.0.1:19092"
    assert settings.profile is KafkaProfile.EMBEDDED


def test_explicit_kafka_profile_without_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_PROFILE", "kafka")
    settings = CommonSettings()
    assert settings.bootstrap == EMBEDDED_BOOTSTRAP
    assert settings.profile is KafkaProfile.KAFKA


def test_unknown_profile_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_PROFILE", "redpanda-ish")
    with pytest.raises(ValueError, match="kafka_profile"):
        CommonSettings()


def test_empty_bootstrap_is_consistent_with_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_BOOTSTRAP", "")
    settings = CommonSettings()
    assert settings.bootstrap == EMBEDDED_BOOTSTRAP
    assert settings.profile is KafkaProfile.EMBEDDED


def test_data_dir_and_blob_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert CommonSettings().data_dir == tmp_path / "xdg" / "captionstream"
    monkeypatch.setenv("CAPTIONSTREAM_DATA_DIR", str(tmp_path / "data"))
    settings = CommonSettings()
    assert settings.data_dir == tmp_path / "data"
    assert settings.blob_dir == tmp_path / "data" / "blobs"


def test_component_settings_read_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_MAX_UPLOAD_BYTES", "1000")
    monkeypatch.setenv("CAPTIONSTREAM_PORT", "8123")
    monkeypatch.setenv("CAPTIONSTREAM_MODEL", "tiny-blip")
    monkeypatch.setenv("CAPTIONSTREAM_MAX_BATCH_SIZE", "3")
    gateway = GatewaySettings()
    assert (gateway.max_upload_bytes, gateway.port) == (1000, 8123)
    processor = ProcessorSettings()
    assert (processor.model, processor.max_batch_size) == ("tiny-blip", 3)


def test_settings_validate_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="max_batch_size"):
        ProcessorSettings()


def test_tuning_follows_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tuning_for(CommonSettings().profile) is EMBEDDED_PROFILE
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_BOOTSTRAP", "broker:9092")
    assert tuning_for(CommonSettings().profile) is KAFKA_PROFILE


def test_topic_config() -> None:
    assert topic_config(TOPICS.job_state) == {"cleanup.policy": "compact"}
    assert topic_config(TOPICS.images) == {}
    assert topic_config(TOPICS.captions) == {}
