"""With Kafka gone, a submit answers 503 with a JSON detail and nothing is half-accepted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from captionstream.broker import EmbeddedBroker, free_port
from captionstream.kafka import (
    KafkaConnection,
    assign_whole_topic,
    ensure_topics,
    own_topics,
    stop_consumer,
)
from captionstream.schemas.topics import TOPICS
from captionstream.settings import KafkaProfile
from tests.helpers.images import make_png
from tests.integration.stack import Stack, wait_until


async def test_submit_answers_503_when_the_broker_is_down(stack: Stack, tmp_path: Path) -> None:
    broker = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu.log").start()
    try:
        gateway = stack.start_gateway(
            CAPTIONSTREAM_KAFKA_BOOTSTRAP=broker.bootstrap, CAPTIONSTREAM_KAFKA_TIMEOUT_S="3"
        )
        assert gateway.upload(make_png()).status_code == 202
        broker.stop()

        started = time.monotonic()
        response = gateway.upload(make_png(color=(1, 2, 3)))
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert "Kafka" in response.json()["detail"]
        assert response.headers["retry-after"] == "2", "when to try again"
        assert elapsed < 15, "the client is not kept waiting past the Kafka timeout"
        assert gateway.healthy(), "liveness does not depend on Kafka"
    finally:
        broker.stop()


def test_a_gateway_started_before_its_kafka_becomes_ready_when_kafka_comes(
    stack: Stack, tmp_path: Path
) -> None:
    """Kafka not there yet (it starts after the gateway, or is down): the gateway serves
    unready, with the cause, instead of exiting, and becomes ready once Kafka answers."""
    port = free_port()
    gateway = stack.start_gateway(ready=False, CAPTIONSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert "nothing listens there" in ready.json()["detail"]
    early = gateway.upload(make_png(color=(4, 5, 6)))
    assert early.status_code == 503
    assert "not connected to Kafka" in early.json()["detail"]
    assert gateway.status("0" * 32).status_code == 503, "not 404: the view is not built yet"

    with EmbeddedBroker(port=port, log_file=tmp_path / "late.log"):
        started = time.monotonic()
        wait_until(
            lambda: httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200,
            60,
            "the gateway to connect",
        )
        print(f"ready {time.monotonic() - started:.1f} s after Kafka started")
        assert gateway.upload(make_png(color=(4, 5, 7))).status_code == 202


async def test_a_reader_stops_cleanly_when_the_broker_has_just_left(tmp_path: Path) -> None:
    """aiokafka's stop() raises CancelledError when a fetch is waiting out its retry
    backoff (Ctrl-C on `captionstream up` stops broker and gateway together);
    `stop_consumer` closes the consumer without letting that out."""
    broker = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu.log").start()
    try:
        kafka = KafkaConnection(broker.bootstrap, KafkaProfile.EMBEDDED)
        topic = TOPICS.captions
        await ensure_topics(kafka, [t for t in own_topics(4) if t.name == topic.name])
        readers = []
        for _ in range(2):
            # A long backoff keeps the failed fetch asleep while the reader stops.
            reader = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, retry_backoff_ms=30_000)
            await reader.start()
            await assign_whole_topic(reader, topic.name)
            readers.append(reader)
        broker.stop()
        await asyncio.sleep(2)  # each reader's next fetch fails, then it backs off

        with pytest.raises(asyncio.CancelledError):
            await readers[0].stop()  # the aiokafka behaviour being worked around
        await asyncio.wait_for(stop_consumer(readers[1]), 10)
    finally:
        broker.stop()
