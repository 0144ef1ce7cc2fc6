"""The gateway's operational and submission API on real processes and the embedded broker:
readiness, metrics, jobs by URL, and upload limits enforced while streaming."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from captionstream.broker import EmbeddedBroker, free_port
from tests.integration.stack import Gateway, Stack, wait_until


def start_gateway(stack: Stack, timeout_s: float = 60, **env: str) -> Gateway:
    """`Stack.start_gateway` with extra environment for this gateway only."""
    port = free_port()
    component = stack.spawn("gateway", CAPTIONSTREAM_PORT=str(port), **env)
    gateway = Gateway(f"http://127.0.0.1:{port}", component)
    wait_until(
        lambda: gateway.healthy() or not component.alive(),
        timeout_s,
        "the gateway to answer /healthz",
    )
    assert component.alive(), f"gateway died:\n{component.log()[-3000:]}"
    return gateway


def readyz(gateway: Gateway, timeout_s: float = 10) -> httpx.Response:
    return httpx.get(f"{gateway.url}/readyz", timeout=timeout_s)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    return stack.start_gateway()


# --- readiness ------------------------------------------------------------------------


def test_readyz_is_ready_on_a_healthy_stack(gateway: Gateway) -> None:
    response = readyz(gateway)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["broker"].startswith("ok")
    assert body["checks"]["job_view"].startswith("ok")
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).json() == {"status": "ok"}


def test_readyz_follows_the_broker(stack: Stack, tmp_path: Path) -> None:
    """A frozen broker (accepts TCP, never answers) and a dead one both make the gateway
    unready, naming the broker, within the probe timeout; liveness is unaffected."""
    broker = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu.log").start()
    try:
        gateway = start_gateway(
            stack,
            CAPTIONSTREAM_KAFKA_BOOTSTRAP=broker.bootstrap,
            CAPTIONSTREAM_READINESS_TIMEOUT_S="1",
        )
        wait_until(lambda: readyz(gateway).status_code == 200, 30, "the gateway to be ready")

        assert broker._proc is not None  # the test's own broker process
        pid = broker._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = readyz(gateway)
            elapsed = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert response.status_code == 503, response.text
        assert elapsed < 5, "the probe is bounded by CAPTIONSTREAM_READINESS_TIMEOUT_S"
        body = response.json()
        assert body["detail"].startswith("not ready: broker:"), body
        assert "within 1s" in body["checks"]["broker"]
        assert body["checks"]["job_view"].startswith("ok"), "only the failing check is named"

        wait_until(lambda: readyz(gateway).status_code == 200, 30, "readiness to come back")

        broker.stop()
        response = readyz(gateway)
        assert response.status_code == 503, response.text
        assert "broker" in response.json()["detail"]
        assert gateway.healthy(), "liveness does not depend on Kafka"
        assert gateway.component is not None
        gateway.component.stop()
    finally:
        broker.stop()
