"""Liveness (`/healthz`) and readiness (`/readyz`) probes."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from captionstream.gateway.deps import GatewayDep
from captionstream.schemas.api import NotReadyResponse, ReadinessResponse

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def healthz() -> dict[str, str]:
    """Liveness: the process serves requests (checks nothing else)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    responses={503: {"model": NotReadyResponse}},
)
async def readyz(gateway: GatewayDep) -> ReadinessResponse | JSONResponse:
    """Readiness: Kafka answers a metadata request and the job view has caught up."""
    checks = await gateway.readiness.checks()
    by_name = {check.name: check.detail for check in checks}
    failing = [check for check in checks if not check.ok]
    if failing:
        detail = "not ready: " + "; ".join(f"{c.name}: {c.detail}" for c in failing)
        body = NotReadyResponse(detail=detail, checks=by_name)
        return JSONResponse(body.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return ReadinessResponse(checks=by_name)
