"""Prometheus metrics of one gateway app instance, served at `/metrics`.

Each app gets its own `CollectorRegistry` (created in the lifespan), so two apps in one
process (tests, embedding) never share or double-register series.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captionstream.gateway.view import JobView
from captionstream.observability import END_TO_END_BUCKETS
from captionstream.schemas.events import JobState, utcnow

UNMATCHED_ROUTE = (
    "<unmatched>"  # one label for every path no route matched (no cardinality blow-up)
)


class _ViewCollector(Collector):
    """Jobs in the view by status, computed when scraped."""

    def __init__(self, view: JobView) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "captionstream_gateway_view_jobs",
            "Jobs in this gateway's job view, by status.",
            labels=["status"],
        )
        for status, count in self.view.count_by_status().items():
            family.add_metric([status.value], count)
        yield family


class GatewayMetrics:
    def __init__(self, view: JobView) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_ViewCollector(view))
        self.http_requests = Counter(
            "captionstream_gateway_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "captionstream_gateway_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "captionstream_gateway_jobs_submitted",
            "Jobs accepted by this gateway, by how the image came (upload or url).",
            ["source"],
            registry=self.registry,
        )
        self.websockets_open = Gauge(
            "captionstream_gateway_websocket_connections",
            "WebSocket connections open now.",
            registry=self.registry,
        )
        self.end_to_end = Histogram(
            "captionstream_job_end_to_end_seconds",
            "Seconds from a job's submitted_at until this gateway's view saw it terminal, "
            "by terminal status (jobs replayed while the view was rebuilt are not counted).",
            ["status"],
            buckets=END_TO_END_BUCKETS,
            registry=self.registry,
        )

        self.webhook_deliveries = Counter(
            "captionstream_gateway_webhook_deliveries",
            "Webhooks this gateway finished, by outcome: delivered (2xx), rejected (another "
            "answer that is not worth retrying), exhausted (out of attempts), refused (the "
            "URL no longer passes the SSRF guard).",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_attempts = Counter(
            "captionstream_gateway_webhook_attempts",
            "Webhook HTTP attempts, by result: the status class (2xx, 3xx, 4xx, 5xx), 429, "
            "or error (no answer: connection failed or timed out).",
            ["result"],
            registry=self.registry,
        )

    def observe_terminal(self, state: JobState) -> None:
        seconds = (utcnow() - state.submitted_at).total_seconds()
        self.end_to_end.labels(state.status.value).observe(max(seconds, 0.0))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HttpMetricsMiddleware:
    """Counts and times every HTTP request by route template (pure ASGI: streaming-safe).

    Reads the metrics from the app's `GatewayState` (`app.state.gateway.metrics`), which
    the lifespan creates; requests served without it (none in practice) are simply not
    counted. The `route` label is
    the matched route's `path`: routers must carry their prefix themselves
    (`APIRouter(prefix=...)`), because a prefix given to `include_router` is not part of
    `route.path` in current FastAPI.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics: GatewayMetrics | None = None
        if scope["type"] == "http" and "app" in scope:
            gateway = getattr(scope["app"].state, "gateway", None)
            metrics = getattr(gateway, "metrics", None)
        if metrics is None:
            await self.app(scope, receive, send)
            return

        status = 500  # what the client gets if the app raises before answering
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            method = scope["method"]
            metrics.http_requests.labels(route, method, str(status)).inc()
            metrics.http_duration.labels(route, method).observe(time.perf_counter() - started)
