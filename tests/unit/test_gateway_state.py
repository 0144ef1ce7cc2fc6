"""The routes read one typed `GatewayState` from `app.state.gateway`: until the gateway has
reached Kafka, what needs Kafka answers 503 with the cause (and /readyz says why), while
liveness and metrics answer as usual. The real app, no lifespan, no broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import pytest

from captionstream.errors import BrokerError
from captionstream.gateway.app import create_app
from captionstream.gateway.metrics import GatewayMetrics
from captionstream.gateway.readiness import Check, NotConnected
from captionstream.gateway.state import GatewayState, KafkaSide
from captionstream.gateway.view import JobView
from captionstream.gateway.webhooks import WebhookGuard
from captionstream.ingest.blobstore import open_blob_store
from captionstream.ingest.fetch import FetchPolicy, ImageFetcher
from captionstream.ingest.validation import ImageLimits
from captionstream.schemas.events import JobState, utcnow
from captionstream.settings import GatewaySettings


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[GatewayState]:
    settings = GatewaySettings(data_dir=tmp_path)
    view = JobView()
    fetcher = ImageFetcher(FetchPolicy.from_settings(settings))
    blobs = open_blob_store(settings)
    yield GatewayState(
        settings=settings,
        view=view,
        metrics=GatewayMetrics(view),
        blobs=blobs,
        fetcher=fetcher,
        limits=ImageLimits.from_settings(settings),
        webhooks=WebhookGuard(settings),
    )
    await fetcher.aclose()
    blobs.close()


@pytest.fixture
async def client(state: GatewayState) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(state.settings)
    app.state.gateway = state
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


class ReadyKafka:
    async def checks(self) -> list[Check]:
        return [Check("broker", True, "ok (1 broker(s))"), Check("job_view", True, "ok")]


def connect(state: GatewayState) -> None:
    """What `open_kafka_side` leaves behind, as far as these routes look."""
    state.kafka = cast(KafkaSide, SimpleNamespace(readiness=ReadyKafka()))
    state.kafka_problem = None


def test_require_kafka_says_why_it_is_missing(state: GatewayState) -> None:
    with pytest.raises(BrokerError, match="not connected to Kafka: connecting"):
        state.require_kafka()
    state.kafka_problem = "nothing listens there"
    with pytest.raises(BrokerError, match="not connected to Kafka: nothing listens there"):
        state.require_kafka()
    assert isinstance(state.readiness, NotConnected)
    connect(state)
    assert state.require_kafka() is state.kafka
    assert state.readiness is state.require_kafka().readiness


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/status/job-1", None),
        ("GET", "/api/v1/jobs/job-1/events", None),
        ("DELETE", "/api/v1/jobs/job-1", None),
        ("POST", "/api/v1/jobs", {"image_url": "https://example.com/cat.jpg"}),
    ],
)
async def test_routes_that_need_kafka_answer_503_with_the_cause(
    state: GatewayState,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict[str, str] | None,
) -> None:
    state.kafka_problem = "nothing listens there"
    state.view.apply(JobState.pending("job-1", utcnow()))  # known, but not to be trusted yet
    response = await client.request(method, path, json=body)
    assert response.status_code == 503, response.text
    assert response.json() == {"detail": "not connected to Kafka: nothing listens there"}
    assert response.headers["retry-after"] == "2"


async def test_probes_and_metrics_answer_while_unconnected(
    state: GatewayState, client: httpx.AsyncClient
) -> None:
    state.kafka_problem = "nothing listens there"
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["broker"] == "nothing listens there"

    connect(state)
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"broker": "ok (1 broker(s))", "job_view": "ok"}


async def test_once_connected_the_view_answers(
    state: GatewayState, client: httpx.AsyncClient
) -> None:
    connect(state)
    state.view.apply(JobState.pending("job-1", utcnow()))
    known = await client.get("/api/v1/status/job-1")
    assert (known.status_code, known.json()["status"]) == (200, "PENDING")
    assert (await client.get("/api/v1/status/job-2")).status_code == 404
