"""Prometheus text exposition of this gateway's metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.deps import MetricsDep

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response)
async def metrics(app_metrics: MetricsDep) -> Response:
    """Prometheus metrics: HTTP traffic, jobs submitted, the job view, WebSockets."""
    body, content_type = app_metrics.exposition()
    return Response(body, media_type=content_type)
