"""Dependency aliases: route signatures name what they need, the lifespan provides it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, WebSocket

from captionstream.errors import BrokerError
from gateway.metrics import GatewayMetrics
from gateway.publisher import KafkaCaptionCache, KafkaJobPublisher
from gateway.readiness import NotConnected, Readiness
from gateway.security import limit_submissions
from gateway.view import JobStateFollower, JobView
from gateway.webhooks import WebhookGuard
from ingest.blobstore import BlobStore
from ingest.fetch import ImageFetcher
from ingest.validation import ImageLimits


def _connected(state: Any) -> None:
    """Refuse (503, with the cause) what needs Kafka while the gateway has not reached it:
    an empty job view would answer 404 for jobs that exist."""
    if not getattr(state, "kafka_connected", True):
        problem = getattr(state, "kafka_problem", None) or "connecting"
        raise BrokerError(f"not connected to Kafka: {problem}")


def _view(request: Request) -> JobView:
    _connected(request.app.state)
    return request.app.state.view  # type: ignore[no-any-return]


def _ws_view(websocket: WebSocket) -> JobView:
    _connected(websocket.app.state)
    return websocket.app.state.view  # type: ignore[no-any-return]


def _publisher(request: Request) -> KafkaJobPublisher:
    _connected(request.app.state)
    return request.app.state.publisher  # type: ignore[no-any-return]


def _cache(request: Request) -> KafkaCaptionCache | None:
    _connected(request.app.state)
    return request.app.state.cache  # type: ignore[no-any-return]


def _blobs(request: Request) -> BlobStore:
    return request.app.state.blobs  # type: ignore[no-any-return]


def _limits(request: Request) -> ImageLimits:
    return request.app.state.limits  # type: ignore[no-any-return]


def _follower(request: Request) -> JobStateFollower:
    _connected(request.app.state)
    return request.app.state.follower  # type: ignore[no-any-return]


def _readiness(request: Request) -> Readiness | NotConnected:
    return request.app.state.readiness  # type: ignore[no-any-return]


def _metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def _ws_metrics(websocket: WebSocket) -> GatewayMetrics:
    return websocket.app.state.metrics  # type: ignore[no-any-return]


def _fetcher(request: Request) -> ImageFetcher:
    return request.app.state.fetcher  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Submission:
    """What accepting a job needs, from the lifespan (one dependency for the submit routes)."""

    view: JobView
    publisher: KafkaJobPublisher
    blobs: BlobStore
    limits: ImageLimits
    metrics: GatewayMetrics
    cache: KafkaCaptionCache | None
    webhooks: WebhookGuard


def _submission(request: Request) -> Submission:
    state = request.app.state
    _connected(state)
    return Submission(
        view=state.view,
        publisher=state.publisher,
        blobs=state.blobs,
        limits=state.limits,
        metrics=state.metrics,
        cache=state.cache,
        webhooks=state.webhooks,
    )


SubmissionDep = Annotated[Submission, Depends(_submission)]
ViewDep = Annotated[JobView, Depends(_view)]
WsViewDep = Annotated[JobView, Depends(_ws_view)]
PublisherDep = Annotated[KafkaJobPublisher, Depends(_publisher)]
CacheDep = Annotated[KafkaCaptionCache | None, Depends(_cache)]
BlobsDep = Annotated[BlobStore, Depends(_blobs)]
LimitsDep = Annotated[ImageLimits, Depends(_limits)]
FollowerDep = Annotated[JobStateFollower, Depends(_follower)]
ReadinessDep = Annotated[Readiness | NotConnected, Depends(_readiness)]
MetricsDep = Annotated[GatewayMetrics, Depends(_metrics)]
WsMetricsDep = Annotated[GatewayMetrics, Depends(_ws_metrics)]
FetcherDep = Annotated[ImageFetcher, Depends(_fetcher)]
# Route dependency of the submission routes: 429 past the client's rate limit.
SubmissionRateLimit = Depends(limit_submissions)
