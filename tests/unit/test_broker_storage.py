"""The embedded broker's storage setting and the environment it gives Tansu."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from captionstream.broker import MEMORY_STORAGE, EmbeddedBroker, s3_env
from captionstream.cli import embedded_broker
from captionstream.errors import BrokerError
from captionstream.settings import BrokerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CAPTIONSTREAM_"):
            monkeypatch.delenv(name)


def test_memory_by_default() -> None:
    settings = BrokerSettings()
    assert settings.broker_storage == MEMORY_STORAGE
    broker = embedded_broker(settings, None)
    assert broker.storage == MEMORY_STORAGE
    assert broker.env == {}
    assert broker.bootstrap == "127.0.0.1:9092"


def test_s3_storage_with_a_local_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_BROKER_STORAGE", "s3://captionstream/")
    monkeypatch.setenv("CAPTIONSTREAM_BROKER_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("CAPTIONSTREAM_BROKER_S3_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("CAPTIONSTREAM_BROKER_S3_SECRET_ACCESS_KEY", "s3cr3t")
    settings = BrokerSettings()
    assert "s3cr3t" not in repr(settings)
    broker = embedded_broker(settings, 19092)
    assert broker.storage == "s3://captionstream/"
    assert broker.bootstrap == "127.0.0.1:19092"
    assert broker.env == {
        "AWS_ENDPOINT": "http://127.0.0.1:9000",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    }


def test_https_endpoint_and_region() -> None:
    assert s3_env("https://s3.example.com", region="eu-west-1") == {
        "AWS_ENDPOINT": "https://s3.example.com",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    assert s3_env() == {}  # AWS_* from the environment, or AWS itself


@pytest.mark.parametrize("storage", ["file:///tmp/x", "postgres://db", "s3://", "memory://", ""])
def test_storage_engines_not_in_this_build_are_refused(
    storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BrokerError, match="memory://NAME/"):
        EmbeddedBroker(storage=storage)
    monkeypatch.setenv("CAPTIONSTREAM_BROKER_STORAGE", storage)
    with pytest.raises(ValidationError):
        BrokerSettings()
