"""With Kafka gone, a submit answers 503 with a JSON detail and nothing is half-accepted."""

from __future__ import annotations

import time
from pathlib import Path

from captionstream.broker import EmbeddedBroker, free_port
from tests.conftest import make_png
from tests.integration.stack import Stack


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
        assert elapsed < 15, "the client is not kept waiting past the Kafka timeout"
        assert gateway.healthy(), "liveness does not depend on Kafka"
    finally:
        broker.stop()
