"""What the gateway's lifespan builds for its routes: one typed object on `app.state`.

`GatewayState` exists from start-up; its `kafka` part only once Kafka has been reached
(the gateway serves unready until then, see `gateway.app.keep_connecting`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from captionstream.errors import BrokerError
from captionstream.gateway.metrics import GatewayMetrics
from captionstream.gateway.readiness import NotConnected, Readiness
from captionstream.gateway.view import JobStateFollower, JobView
from captionstream.gateway.webhooks import WebhookDispatcher, WebhookGuard
from captionstream.ingest.blobstore import BlobStore
from captionstream.ingest.fetch import ImageFetcher
from captionstream.ingest.kafka_publishing import KafkaCaptionCache, KafkaJobPublisher
from captionstream.ingest.validation import ImageLimits
from captionstream.settings import GatewaySettings


@dataclass(frozen=True, slots=True)
class KafkaSide:
    """What the gateway holds open on Kafka: its producer (and the publisher and caption
    cache writing through it), the job view's follower, the webhook dispatcher and the
    TTL sweeper; `close` stops them in reverse order."""

    producer: AIOKafkaProducer
    publisher: KafkaJobPublisher
    cache: KafkaCaptionCache | None  # None: CAPTIONSTREAM_CAPTION_CACHE is off
    follower: JobStateFollower
    readiness: Readiness
    dispatcher: WebhookDispatcher | None  # None: webhooks are off
    sweeper: asyncio.Task[None]

    async def close(self) -> None:
        self.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sweeper
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        await self.follower.stop()
        await self.producer.stop()


@dataclass(slots=True)
class GatewayState:
    """Everything the routes use, made by the lifespan. Only `kafka` (None until the
    gateway reaches Kafka) and `kafka_problem` (why it has not, for /readyz and the 503s)
    change after start-up."""

    settings: GatewaySettings
    view: JobView
    metrics: GatewayMetrics
    blobs: BlobStore
    fetcher: ImageFetcher
    limits: ImageLimits
    webhooks: WebhookGuard
    kafka: KafkaSide | None = None
    kafka_problem: str | None = None

    def require_kafka(self) -> KafkaSide:
        """The Kafka side, or 503 with the cause while there is none: what needs Kafka
        cannot be served, and an empty job view would answer 404 for jobs that exist."""
        if self.kafka is None:
            raise BrokerError(f"not connected to Kafka: {self.kafka_problem or 'connecting'}")
        return self.kafka

    @property
    def readiness(self) -> Readiness | NotConnected:
        if self.kafka is not None:
            return self.kafka.readiness
        return NotConnected(lambda: self.kafka_problem)
