"""Prometheus text exposition of this gateway's metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from captionstream.gateway.deps import GatewayDep

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {
                "text/plain": {
                    "schema": {"type": "string"},
                    "example": "# TYPE captionstream_gateway_jobs_submitted_total counter\n"
                    'captionstream_gateway_jobs_submitted_total{source="upload"} 3.0\n',
                }
            },
        }
    },
)
async def metrics(gateway: GatewayDep) -> Response:
    """Prometheus metrics: HTTP traffic, jobs submitted, the job view, WebSockets."""
    body, content_type = gateway.metrics.exposition()
    return Response(body, media_type=content_type)
