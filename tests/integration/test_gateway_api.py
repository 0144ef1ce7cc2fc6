"""The gateway's operational and submission API on real processes and the embedded broker:
readiness, metrics, jobs by URL, and upload limits enforced while streaming."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import websockets
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from captionstream.broker import EmbeddedBroker, free_port
from schemas.events import JobState, utcnow
from schemas.topics import TOPICS
from tests.conftest import make_png
from tests.integration.stack import Component, Gateway, Stack, wait_until


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


# --- metrics --------------------------------------------------------------------------


def scrape(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics as {(name, labels): value}."""
    response = httpx.get(f"{gateway.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_a_job_from_upload_to_success(gateway: Gateway, worker: Component) -> None:
    before = scrape(gateway)
    response = gateway.upload(make_png(40, 30, color=(10, 200, 10)))
    assert response.status_code == 202, response.text
    assert gateway.wait_terminal(response.json()["job_id"])["status"] == "SUCCESS"

    after = scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("captionstream_gateway_jobs_submitted_total", source="upload") == 1
    assert delta("captionstream_job_end_to_end_seconds_count", status="SUCCESS") == 1
    assert delta("captionstream_gateway_view_jobs", status="SUCCESS") == 1
    assert (
        delta(
            "captionstream_gateway_http_requests_total",
            route="/api/v1/upload",
            method="POST",
            status="202",
        )
        == 1
    )
    assert (
        delta(
            "captionstream_gateway_http_requests_total",
            route="/api/v1/status/{job_id}",
            method="GET",
            status="200",
        )
        >= 1
    )
    assert sample(after, "process_resident_memory_bytes") > 0


async def test_metrics_count_open_websockets(stack: Stack, gateway: Gateway) -> None:
    """A job that stays PENDING (no image event) keeps its WebSocket open."""
    job_id = "ws-metrics-" + utcnow().strftime("%H%M%S%f")
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, max_batch_size=1)
    await producer.start()
    try:
        state = JobState.pending(job_id, utcnow())
        await producer.send_and_wait(
            TOPICS.job_state.name, state.model_dump_json().encode(), key=job_id.encode()
        )
    finally:
        await producer.stop()
    wait_until(lambda: gateway.status(job_id).status_code == 200, 30, "the view to see the job")

    name = "captionstream_gateway_websocket_connections"
    assert sample(scrape(gateway), name) == 0
    async with websockets.connect(f"{gateway.ws_url}/api/v1/ws/{job_id}") as ws:
        assert "PENDING" in str(await ws.recv())
        assert sample(scrape(gateway), name) == 1
    wait_until(lambda: sample(scrape(gateway), name) == 0, 10, "the gauge to drop on close")
