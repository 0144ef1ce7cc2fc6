"""The FastAPI application: resources are created in the lifespan and live on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from captionstream.errors import BrokerError, CaptionstreamError
from captionstream.kafka import KafkaConnection, ensure_topics, own_topics
from captionstream.settings import GatewaySettings
from gateway.body_limit import MULTIPART_OVERHEAD_BYTES, BodySizeLimitMiddleware
from gateway.metrics import GatewayMetrics, HttpMetricsMiddleware
from gateway.publisher import KafkaCaptionCache, KafkaJobPublisher
from gateway.readiness import NotConnected, Readiness
from gateway.routes import demo, health, jobs, metrics
from gateway.security import api_router_options, install_security
from gateway.view import JobStateFollower, JobView
from gateway.webhooks import WebhookDispatcher, WebhookGuard, WebhookSender
from ingest.blobstore import open_blob_store
from ingest.fetch import FetchPolicy, ImageFetcher
from ingest.validation import ImageLimits, allow_pixels
from schemas.events import JobState, utcnow
from schemas.topics import TOPICS

log = logging.getLogger(__name__)


async def sweep_expired_jobs(
    view: JobView, publisher: KafkaJobPublisher, settings: GatewaySettings
) -> None:
    """Every janitor interval, drop jobs that finished more than job_ttl_s ago from this
    replica's memory. Workers delete the jobs they ran (state, table entry, image); jobs
    answered from the caption cache never reached a worker, so their tombstone comes
    from here (every replica may send it: a repeated tombstone is harmless)."""
    while True:
        await asyncio.sleep(settings.janitor_interval_s)
        cutoff = utcnow() - timedelta(seconds=settings.job_ttl_s)
        for state in view.expired(cutoff):
            view.forget(state.job_id)
            if state.cached_from is not None:
                try:
                    await publisher.publish_tombstone(state.job_id)
                except KafkaError as exc:
                    log.warning("could not expire job %s: %r", state.job_id, exc)


@dataclass
class KafkaSide:
    """What the gateway holds open on Kafka: its producer, the job view's follower, the
    webhook dispatcher and the TTL sweeper."""

    producer: AIOKafkaProducer
    follower: JobStateFollower
    dispatcher: WebhookDispatcher | None
    sweeper: asyncio.Task[None]

    async def close(self) -> None:
        self.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sweeper
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        await self.follower.stop()
        await self.producer.stop()


async def open_kafka_side(app: FastAPI, settings: GatewaySettings, view: JobView) -> KafkaSide:
    """Check the topics, start the producer, rebuild the job view, start webhooks and the
    sweeper; then put them on `app.state`. What started is stopped again on failure."""
    kafka = KafkaConnection.from_settings(settings, "gateway")
    await ensure_topics(
        kafka, own_topics(settings.partitions), replication_factor=settings.replication_factor
    )
    # A submit waits at most kafka_timeout_s for Kafka before answering 503.
    producer = kafka.producer(request_timeout_s=settings.kafka_timeout_s)
    follower = JobStateFollower(view, kafka, TOPICS.job_state.name)
    dispatcher: WebhookDispatcher | None = None
    try:
        await producer.start()
        await follower.start(settings.view_catch_up_timeout_s)
        if settings.webhooks_enabled:
            sender = WebhookSender(settings, app.state.webhooks, app.state.metrics)
            dispatcher = WebhookDispatcher(settings, kafka, TOPICS.job_state.name, sender)
            await dispatcher.start()
        else:
            log.info("webhooks off (CAPTIONSTREAM_WEBHOOK_SECRET is not set)")
    except BaseException as exc:
        if dispatcher is not None:
            await dispatcher.stop()
        await follower.stop()
        await producer.stop()
        if isinstance(exc, KafkaError | OSError):  # Kafka went away mid-way: try again
            raise BrokerError(f"Kafka failed while the gateway started: {exc!r}") from exc
        raise
    publisher = KafkaJobPublisher(producer)
    sweeper = asyncio.create_task(sweep_expired_jobs(view, publisher, settings), name="ttl-sweep")
    app.state.follower = follower
    app.state.cache = KafkaCaptionCache(view, producer) if settings.caption_cache else None
    app.state.readiness = Readiness(producer.client, follower, settings.readiness_timeout_s)
    app.state.publisher = publisher
    app.state.kafka_connected = True  # last: the routes take this as "connected"
    return KafkaSide(producer, follower, dispatcher, sweeper)


async def keep_connecting(app: FastAPI, settings: GatewaySettings, view: JobView) -> KafkaSide:
    """Try again, backing off to 30 s, until the Kafka side opens; each new cause is
    logged and shown by /readyz and the 503s meanwhile."""
    delay = 1.0
    while True:
        await asyncio.sleep(delay)
        try:
            side = await open_kafka_side(app, settings, view)
        except BrokerError as exc:
            if exc.detail != app.state.kafka_problem:
                log.error("still not connected to Kafka: %s", exc.detail)
            app.state.kafka_problem = exc.detail
            delay = min(30.0, delay * 2)
            continue
        app.state.kafka_problem = None
        log.info("connected to Kafka; ready")
        return side


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        allow_pixels(settings.max_pixels)
        # A blob store that cannot be used fails start-up first, saying what to change.
        blobs = open_blob_store(settings)
        await asyncio.to_thread(blobs.check)
        view = JobView()
        app_metrics = GatewayMetrics(view)

        def observe_terminal(state: JobState) -> None:
            # Only live completions: states replayed while rebuilding the view finished
            # long ago and were already counted by the replica that saw them happen.
            follower: JobStateFollower | None = getattr(app.state, "follower", None)
            if follower is not None and follower.caught_up.is_set():
                app_metrics.observe_terminal(state)

        view.terminal_listeners.append(observe_terminal)
        fetcher = ImageFetcher(FetchPolicy.from_settings(settings))
        app.state.settings = settings
        app.state.view = view
        app.state.metrics = app_metrics
        app.state.blobs = blobs
        app.state.fetcher = fetcher
        app.state.limits = ImageLimits.from_settings(settings)
        app.state.webhooks = WebhookGuard(settings)
        app.state.kafka_connected = False
        app.state.kafka_problem = None
        side: KafkaSide | None = None
        connecting: asyncio.Task[KafkaSide] | None = None
        try:
            try:
                side = await open_kafka_side(app, settings, view)
            except BrokerError as exc:
                # Kafka unreachable, or refusing these credentials: serve unready (liveness
                # stays up; /readyz and submits answer 503 with the cause) and keep trying,
                # rather than exit into a restart loop. A wrong setting elsewhere (a topic
                # unlike the plan, a bad blob store) still stops start-up.
                log.error("not connected to Kafka: %s; serving unready, retrying", exc.detail)
                app.state.kafka_problem = exc.detail
                app.state.readiness = NotConnected(lambda: app.state.kafka_problem)
                connecting = asyncio.create_task(
                    keep_connecting(app, settings, view), name="kafka-connect"
                )
            yield
        finally:
            if connecting is not None:
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    side = await connecting
            if side is not None:
                await side.close()
            await fetcher.aclose()
            blobs.close()

    app = FastAPI(
        title="captionstream",
        version="1",
        summary="Image captioning as a Kafka stream-processing pipeline.",
        lifespan=lifespan,
    )

    @app.exception_handler(CaptionstreamError)
    async def captionstream_error(request: Request, exc: CaptionstreamError) -> JSONResponse:
        headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(
            status_code=exc.http_status, content={"detail": exc.detail}, headers=headers
        )

    # Outermost last: metrics also count the 413s of the body limit.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
    )
    app.add_middleware(HttpMetricsMiddleware)
    install_security(app, settings)  # API keys, rate limit, CORS (outermost)
    app.include_router(jobs.router, **api_router_options(settings))
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(demo.router)  # the demo page at / and /demo
    return app
