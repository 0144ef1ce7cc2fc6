"""Every Kafka client is built by `KafkaConnection`: what each profile and setting puts
into the clients' arguments (the clients themselves run against real brokers in the
integration tests)."""

from __future__ import annotations

import pytest

from captionstream.kafka import EMBEDDED_PROFILE, KafkaConnection
from captionstream.settings import CommonSettings, KafkaCompression, KafkaProfile


def connection(monkeypatch: pytest.MonkeyPatch, **env: str) -> KafkaConnection:
    for name, value in env.items():
        monkeypatch.setenv(f"CAPTIONSTREAM_{name.upper()}", value)
    return KafkaConnection.from_settings(CommonSettings(), "gateway")


def test_embedded_profile_keeps_its_workarounds(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = connection(monkeypatch)
    assert kafka.profile is KafkaProfile.EMBEDDED
    producer = kafka.producer_kwargs()
    assert producer["max_batch_size"] == 1  # Tansu's end offsets need one record a batch
    assert "enable_idempotence" not in producer  # Tansu rejects InitProducerId v0
    assert "compression_type" not in producer
    assert producer["acks"] == "all"
    group = kafka.group_kwargs()
    assert group["session_timeout_ms"] == 4000  # Tansu holds JoinGroup for half of it
    assert group["heartbeat_interval_ms"] == 1000
    faust = kafka.faust_settings()
    assert faust["producer_max_batch_size"] == 1
    assert faust["broker_session_timeout"] == EMBEDDED_PROFILE.session_timeout_s
    assert faust["broker_heartbeat_interval"] == EMBEDDED_PROFILE.heartbeat_interval_s


def test_kafka_profile_is_tuned_for_production(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = connection(monkeypatch, kafka_bootstrap="k1:9092, k2:9092")
    assert kafka.profile is KafkaProfile.KAFKA
    producer = kafka.producer_kwargs(request_timeout_s=2.5)
    assert producer == {
        "bootstrap_servers": ["k1:9092", "k2:9092"],
        "client_id": "captionstream-gateway",
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": "lz4",
        "request_timeout_ms": 2500,
        "security_protocol": "PLAINTEXT",
    }
    assert kafka.group_kwargs() == {"session_timeout_ms": 10_000, "heartbeat_interval_ms": 3000}
    faust = kafka.faust_settings()
    assert faust["broker"] == ["kafka://k1:9092", "kafka://k2:9092"]
    assert faust["broker_client_id"] == "captionstream-gateway"
    assert faust["producer_acks"] == -1
    assert faust["producer_compression_type"] == "lz4"
    assert "producer_max_batch_size" not in faust


def test_settings_override_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = connection(
        monkeypatch,
        kafka_bootstrap="k1:9092",
        kafka_client_id="acme",
        kafka_compression="none",
        kafka_session_timeout_s="45",
        kafka_heartbeat_interval_s="5",
        kafka_rebalance_timeout_s="90",
        kafka_group_instance_id="worker-a",
    )
    assert kafka.compression is KafkaCompression.NONE
    assert "compression_type" not in kafka.producer_kwargs()
    assert kafka.producer_kwargs()["client_id"] == "acme-gateway"
    assert kafka.group_kwargs() == {
        "session_timeout_ms": 45_000,
        "heartbeat_interval_ms": 5000,
        "rebalance_timeout_ms": 90_000,
        "group_instance_id": "worker-a",
    }
    faust = kafka.faust_settings()
    assert faust["broker_session_timeout"] == 45
    assert faust["broker_rebalance_timeout"] == 90
    assert faust["consumer_group_instance_id"] == "worker-a"
    assert "producer_compression_type" not in faust


def test_faust_reads_no_unprefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Celery-era BROKER_URL in the environment must not point a worker elsewhere."""
    import faust

    monkeypatch.setenv("BROKER_URL", "kafka://elsewhere:9092")
    monkeypatch.setenv("TOPIC_PARTITIONS", "99")
    kafka = connection(monkeypatch, kafka_bootstrap="k1:9092")
    app = faust.App("t", **kafka.faust_settings())
    assert [str(url) for url in app.conf.broker] == ["kafka://k1:9092"]
    assert app.conf.topic_partitions != 99
