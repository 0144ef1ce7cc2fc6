"""Readiness: may this replica take traffic? (Liveness is `/healthz`, which never checks.)

Two checks, both cheap enough for a load balancer to poll every few seconds:
- `broker`: the producer's client gets cluster metadata from a broker within a short
  timeout (a job cannot be accepted without Kafka);
- `job_view`: the job-state follower is running and has caught up with the topic (a
  replica that is still rebuilding its view would answer 404 for jobs that exist).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError

from captionstream.gateway.view import JobStateFollower


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


class Readiness:
    def __init__(self, kafka_client: Any, follower: JobStateFollower, timeout_s: float) -> None:
        # `kafka_client`: the producer's AIOKafkaClient (untyped library).
        self.kafka_client = kafka_client
        self.follower = follower
        self.timeout_s = timeout_s

    async def broker(self) -> Check:
        try:
            async with asyncio.timeout(self.timeout_s):
                metadata = await self.kafka_client.fetch_all_metadata()
        except TimeoutError:
            return Check("broker", False, f"no metadata from Kafka within {self.timeout_s:g}s")
        except (KafkaError, OSError) as exc:
            return Check("broker", False, f"Kafka unreachable: {exc}")
        return Check("broker", True, f"ok ({len(metadata.brokers())} broker(s))")

    def job_view(self) -> Check:
        follower = self.follower
        if not follower.running:
            return Check("job_view", False, "the job-state follower is not running")
        if not follower.caught_up.is_set():
            return Check("job_view", False, "still rebuilding the job view from the topic")
        return Check("job_view", True, f"ok ({len(follower.view)} jobs)")

    async def checks(self) -> list[Check]:
        return [await self.broker(), self.job_view()]


class NotConnected:
    """Readiness of a gateway that has not reached Kafka yet: both checks fail, the broker
    check with the cause (`problem()`: the latest diagnosis)."""

    def __init__(self, problem: Callable[[], str | None]) -> None:
        self.problem = problem

    async def checks(self) -> list[Check]:
        return [
            Check("broker", False, self.problem() or "connecting"),
            Check("job_view", False, "not started: no connection to Kafka yet"),
        ]
