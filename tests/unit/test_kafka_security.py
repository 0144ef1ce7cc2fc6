"""Kafka security settings: what each combination puts into every client, and which
combinations are refused at start-up. (The handshakes themselves run against real
secured listeners in tests/integration/test_kafka_security.py.)"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import faust
import pytest
from pydantic import ValidationError

from captionstream.broker import free_port
from captionstream.cli import grant_for
from captionstream.errors import BrokerError, ConfigurationError
from captionstream.kafka import KafkaConnection, ensure_topics
from captionstream.kafka.acls import component_acls
from captionstream.kafka.diagnose import diagnose
from captionstream.settings import CommonSettings, KafkaProfile
from tests.tls import TestCA


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> CommonSettings:
    for name, value in env.items():
        monkeypatch.setenv(f"CAPTIONSTREAM_{name.upper()}", value)
    return CommonSettings()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestCA, Path, Path]:
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    client = ca.issue("client", server=False)
    return ca, client.cert, client.key


def test_plaintext_is_the_default_and_adds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = KafkaConnection.from_settings(settings(monkeypatch), "gateway")
    assert kafka.security.aiokafka_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert "broker_credentials" not in kafka.faust_settings()


def test_scram_over_tls_reaches_every_client_and_faust(
    monkeypatch: pytest.MonkeyPatch, pki: tuple[TestCA, Path, Path]
) -> None:
    ca, _, _ = pki
    kafka = KafkaConnection.from_settings(
        settings(
            monkeypatch,
            kafka_bootstrap="k1:9093",
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="worker",
            kafka_sasl_password="s3cret",
            kafka_ssl_cafile=str(ca.cert_file),
        ),
        "processor",
    )
    for kwargs in (kafka.producer_kwargs(), kafka._common()):
        assert kwargs["security_protocol"] == "SASL_SSL"
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kwargs["sasl_plain_username"] == "worker"
        assert kwargs["sasl_plain_password"] == "s3cret"
        context = kwargs["ssl_context"]
        assert isinstance(context, ssl.SSLContext)
        assert context.check_hostname
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    credentials = kafka.faust_settings()["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert (credentials.username, credentials.password) == ("worker", "s3cret")
    # Secrets never show in what gets logged.
    assert "s3cret" not in repr(kafka)
    assert "s3cret" not in kafka.security.describe()
    assert kafka.security.describe() == f"SASL_SSL, SCRAM-SHA-512 as worker, CA {ca.cert_file}"


def test_mutual_tls_loads_the_client_certificate(
    monkeypatch: pytest.MonkeyPatch, pki: tuple[TestCA, Path, Path]
) -> None:
    ca, cert, key = pki
    kafka = KafkaConnection.from_settings(
        settings(
            monkeypatch,
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=str(ca.cert_file),
            kafka_ssl_certfile=str(cert),
            kafka_ssl_keyfile=str(key),
        ),
        "gateway",
    )
    kwargs = kafka.security.aiokafka_kwargs()
    assert kwargs["security_protocol"] == "SSL"
    assert "sasl_mechanism" not in kwargs
    credentials = kafka.faust_settings()["broker_credentials"]
    assert isinstance(credentials, faust.SSLCredentials)


def test_a_key_that_does_not_match_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, pki: tuple[TestCA, Path, Path], tmp_path: Path
) -> None:
    _, cert, _ = pki
    other_key = TestCA(tmp_path).issue("other", server=False).key
    kafka = KafkaConnection.from_settings(
        settings(
            monkeypatch,
            kafka_security_protocol="SSL",
            kafka_ssl_certfile=str(cert),
            kafka_ssl_keyfile=str(other_key),
        ),
        "gateway",
    )
    with pytest.raises(ConfigurationError, match="cannot load the Kafka TLS files"):
        kafka.producer_kwargs()


def test_oauthbearer_uses_the_named_token_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = KafkaConnection.from_settings(
        settings(
            monkeypatch,
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="OAUTHBEARER",
            kafka_sasl_oauth_token_provider="tests.tokens:unsigned_token_provider",
        ),
        "ingest",
    )
    provider = kafka.security.aiokafka_kwargs()["sasl_oauth_token_provider"]
    token = asyncio.run(provider.token())
    assert token.count(".") == 2
    assert isinstance(kafka.faust_settings()["broker_credentials"], faust.OAuthCredentials)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs kafka_sasl_mechanism"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-256"},
            "needs kafka_sasl_username and kafka_sasl_password",
        ),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "OAUTHBEARER"},
            "needs kafka_sasl_oauth_token_provider",
        ),
        ({"kafka_sasl_mechanism": "PLAIN"}, "needs kafka_security_protocol SASL_SSL"),
        ({"kafka_ssl_cafile": "/etc/hostname"}, "does not use TLS"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": "/etc/hostname"},
            "needs both kafka_ssl_certfile and kafka_ssl_keyfile",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"},
            "no such file",
        ),
        ({"kafka_security_protocol": "KERBEROS"}, "kafka_security_protocol"),
    ],
)
def test_contradictory_settings_fail_at_start_up(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        settings(monkeypatch, **env)


def test_an_unimportable_token_provider_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = KafkaConnection.from_settings(
        settings(
            monkeypatch,
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="OAUTHBEARER",
            kafka_sasl_oauth_token_provider="no_such_module:factory",
        ),
        "gateway",
    )
    with pytest.raises(ConfigurationError, match="no_such_module:factory"):
        kafka.admin()


async def test_nothing_listening_is_named_as_such() -> None:
    """The diagnosis of a first contact that failed (no broker needed for this one)."""
    kafka = KafkaConnection(f"127.0.0.1:{free_port()}", KafkaProfile.KAFKA)
    assert "connection refused: nothing listens there" in await diagnose(kafka)
    with pytest.raises(BrokerError, match="connection refused: nothing listens there"):
        await ensure_topics(kafka, [], timeout_s=3)


def test_grants_name_a_component_and_a_principal() -> None:
    acls = component_acls("captionstream-processor", "captionstream-webhooks", transactional=False)
    component, principal, wanted = grant_for("processor=User:worker", acls)
    assert (component, principal, wanted) == ("processor", "User:worker", acls["processor"])
    component, _, wanted = grant_for("tail=User:reader", acls)
    assert component.startswith("downstream consumer")
    assert {acl.name for acl in wanted} == {"captionstream.captions.v1"}
    for bad in ("processor", "processor=worker", "scheduler=User:x"):
        with pytest.raises(ConfigurationError, match="expected COMPONENT=PRINCIPAL"):
            grant_for(bad, acls)
