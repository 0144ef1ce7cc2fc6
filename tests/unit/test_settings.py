"""Settings from the environment, and the Kafka client tuning each profile selects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from captionstream.kafka import EMBEDDED_PROFILE, KAFKA_PROFILE, topic_config, tuning_for
from captionstream.schemas.topics import TOPICS
from captionstream.settings import (
    EMBEDDED_BOOTSTRAP,
    BulkIngestSettings,
    CommonSettings,
    GatewaySettings,
    KafkaProfile,
    ProcessorSettings,
)


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


# --- closed choices ---------------------------------------------------------------------


def test_an_unknown_precision_names_the_setting_and_its_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_PRECISION", "fp8")
    with pytest.raises(ValidationError) as info:
        ProcessorSettings()
    [error] = info.value.errors()
    assert error["loc"] == ("precision",)
    message = str(info.value)
    assert "'fp8'" in message
    for choice in ("auto", "fp32", "bf16", "fp16"):
        assert f"'{choice}'" in message


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("PRECISION", " BF16 ", "precision", "bf16"),
        ("PRECISION", "FP32", "precision", "fp32"),
        ("VISION_ATTENTION", "SDPA", "vision_attention", "sdpa"),
    ],
)
def test_worker_choices_are_read_in_any_case(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: str
) -> None:
    """As processor/ has always read them: `resolve_precision` lower-cases too."""
    monkeypatch.setenv(f"CAPTIONSTREAM_{variable}", value)
    assert getattr(ProcessorSettings(), field) == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VISION_ATTENTION", "flash"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_LEVEL", "info"),  # `logging.config` refuses it: better here, by name
        ("CAPTIONER", "blip2"),
        ("CAPTIONER", "plugin_module_without_factory"),
        ("CAPTIONER", "module:factory.attribute"),
        ("DEVICE", "CUDA"),
        ("DEVICE", "cuda:first"),
        ("DEVICE", ""),
    ],
)
def test_a_value_outside_a_settings_choices_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(f"CAPTIONSTREAM_{variable}", value)
    with pytest.raises(ValidationError) as info:
        ProcessorSettings()
    assert [error["loc"] for error in info.value.errors()] == [(variable.lower(),)]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CAPTIONER", "blip"),
        ("CAPTIONER", "hf-image-to-text"),
        ("CAPTIONER", "tests.integration.flaky:create_slow"),
        ("DEVICE", "auto"),
        ("DEVICE", "cpu"),
        ("DEVICE", "cuda"),
        ("DEVICE", "cuda:1"),
        ("DEVICE", "mps"),
        ("LOG_LEVEL", "DEBUG"),
        ("LOG_LEVEL", "WARN"),
    ],
)
def test_open_choices_accept_what_the_worker_can_use(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(f"CAPTIONSTREAM_{variable}", value)
    assert getattr(ProcessorSettings(), variable.lower()) == value


def test_worker_choice_defaults() -> None:
    settings = ProcessorSettings()
    assert (settings.captioner, settings.device, settings.precision) == ("blip", "auto", "auto")
    assert (settings.vision_attention, settings.log_level) == ("auto", "INFO")


# --- settings shared by several components ---------------------------------------------


def test_each_component_keeps_its_kafka_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """One setting, two defaults: the gateway answers 503 sooner, bulk ingest waits out a
    leader election rather than stop its run."""
    assert GatewaySettings().kafka_timeout_s == 10
    assert BulkIngestSettings().kafka_timeout_s == 30
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_TIMEOUT_S", "3")
    assert GatewaySettings().kafka_timeout_s == BulkIngestSettings().kafka_timeout_s == 3
    monkeypatch.setenv("CAPTIONSTREAM_KAFKA_TIMEOUT_S", "0")
    for component in (GatewaySettings, BulkIngestSettings):
        with pytest.raises(ValidationError, match="kafka_timeout_s"):
            component()


def test_max_pixels_is_one_setting_for_intake_and_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    components = (GatewaySettings, BulkIngestSettings, ProcessorSettings)
    assert {component().max_pixels for component in components} == {200_000_000}
    monkeypatch.setenv("CAPTIONSTREAM_MAX_PIXELS", "1000")
    assert {component().max_pixels for component in components} == {1000}


def test_list_settings_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_FETCH_ALLOW_HOSTS", "Images.Example, [::1],,")
    monkeypatch.setenv("CAPTIONSTREAM_WEBHOOK_ALLOW_HOSTS", "HOOKS.example")
    monkeypatch.setenv("CAPTIONSTREAM_FETCH_ALLOW_NETWORKS", "10.1.2.0/24, fd00::/8")
    monkeypatch.setenv("CAPTIONSTREAM_API_KEYS", "k1, k2")
    monkeypatch.setenv("CAPTIONSTREAM_CORS_ORIGINS", "https://a.example,https://b.example")
    settings = GatewaySettings()
    assert settings.fetch_allow_hosts == ["images.example", "::1"]
    assert settings.webhook_allow_hosts == ["hooks.example"]
    assert [str(n) for n in settings.fetch_allow_networks] == ["10.1.2.0/24", "fd00::/8"]
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert GatewaySettings(webhook_allow_hosts=["[FD00::1]"]).webhook_allow_hosts == ["fd00::1"]
