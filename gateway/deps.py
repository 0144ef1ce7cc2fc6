"""Dependency aliases: route signatures name what they need, the lifespan provides it.

Everything comes from the one `GatewayState` the lifespan puts on `app.state.gateway`;
`HTTPConnection` lets the same getter serve HTTP routes and WebSockets.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.requests import HTTPConnection

from captionstream.gateway.security import limit_submissions
from captionstream.gateway.state import GatewayState, KafkaSide
from captionstream.gateway.view import JobView


def gateway_state(connection: HTTPConnection) -> GatewayState:
    state: GatewayState = connection.app.state.gateway
    return state


GatewayDep = Annotated[GatewayState, Depends(gateway_state)]


def kafka_side(gateway: GatewayDep) -> KafkaSide:
    """503 with the cause while the gateway has not reached Kafka."""
    return gateway.require_kafka()


def job_view(gateway: GatewayDep) -> JobView:
    """The job view, once connected: before that it is empty, and would answer 404 for
    jobs that exist."""
    gateway.require_kafka()
    return gateway.view


KafkaDep = Annotated[KafkaSide, Depends(kafka_side)]
JobViewDep = Annotated[JobView, Depends(job_view)]
# Route dependency of the submission routes: 429 past the client's rate limit.
SubmissionRateLimit = Depends(limit_submissions)
