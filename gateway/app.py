"""The FastAPI application: the lifespan builds a `GatewayState` (gateway.state), the one
thing the routes read from `app.state`, and connects it to Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from captionstream.errors import BrokerError, CaptionstreamError
from captionstream.gateway.body_limit import MULTIPART_OVERHEAD_BYTES, BodySizeLimitMiddleware
from captionstream.gateway.metrics import GatewayMetrics, HttpMetricsMiddleware
from captionstream.gateway.readiness import Readiness
from captionstream.gateway.routes import demo, health, jobs, metrics
from captionstream.gateway.security import api_router_options, install_security
from captionstream.gateway.state import GatewayState, KafkaSide
from captionstream.gateway.view import JobStateFollower, JobView
from captionstream.gateway.webhooks import WebhookDispatcher, WebhookGuard, WebhookSender
from captionstream.ingest.blobstore import open_blob_store
from captionstream.ingest.fetch import FetchPolicy, ImageFetcher
from captionstream.ingest.kafka_publishing import KafkaCaptionCache, KafkaJobPublisher
from captionstream.ingest.validation import ImageLimits, allow_pixels
from captionstream.kafka import KafkaConnection, ensure_topics, own_topics
from captionstream.schemas.events import JobState, utcnow
from captionstream.schemas.topics import TOPICS
from captionstream.settings import GatewaySettings

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


async def open_kafka_side(state: GatewayState) -> KafkaSide:
    """Check the topics, start the producer, rebuild the job view, start webhooks and the
    sweeper. What started is stopped again on failure."""
    settings = state.settings
    kafka = KafkaConnection.from_settings(settings, "gateway")
    await ensure_topics(
        kafka, own_topics(settings.partitions), replication_factor=settings.replication_factor
    )
    # A submit waits at most kafka_timeout_s for Kafka before answering 503.
    producer = kafka.producer(request_timeout_s=settings.kafka_timeout_s)
    follower = JobStateFollower(state.view, kafka, TOPICS.job_state.name)
    dispatcher: WebhookDispatcher | None = None
    try:
        await producer.start()
        await follower.start(settings.view_catch_up_timeout_s)
        if settings.webhooks_enabled:
            sender = WebhookSender(settings, state.webhooks, state.metrics)
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
    return KafkaSide(
        producer=producer,
        publisher=publisher,
        cache=KafkaCaptionCache(state.view, producer) if settings.caption_cache else None,
        follower=follower,
        readiness=Readiness(producer.client, follower, settings.readiness_timeout_s),
        dispatcher=dispatcher,
        sweeper=asyncio.create_task(
            sweep_expired_jobs(state.view, publisher, settings), name="ttl-sweep"
        ),
    )


async def keep_connecting(state: GatewayState) -> None:
    """Try again, backing off to 30 s, until the Kafka side opens (`state.kafka`: from
    then on the routes take the gateway as connected); each new cause is logged and
    shown by /readyz and the 503s meanwhile."""
    delay = 1.0
    while state.kafka is None:
        await asyncio.sleep(delay)
        try:
            state.kafka = await open_kafka_side(state)
        except BrokerError as exc:
            if exc.detail != state.kafka_problem:
                log.error("still not connected to Kafka: %s", exc.detail)
            state.kafka_problem = exc.detail
            delay = min(30.0, delay * 2)
    state.kafka_problem = None
    log.info("connected to Kafka; ready")


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        allow_pixels(settings.max_pixels)
        # A blob store that cannot be used fails start-up first, saying what to change.
        blobs = open_blob_store(settings)
        await asyncio.to_thread(blobs.check)
        view = JobView()
        app_metrics = GatewayMetrics(view)
        fetcher = ImageFetcher(FetchPolicy.from_settings(settings))
        state = GatewayState(
            settings=settings,
            view=view,
            metrics=app_metrics,
            blobs=blobs,
            fetcher=fetcher,
            limits=ImageLimits.from_settings(settings),
            webhooks=WebhookGuard(settings),
        )

        def observe_terminal(job: JobState) -> None:
            # Only live completions: states replayed while rebuilding the view finished
            # long ago and were already counted by the replica that saw them happen.
            if state.kafka is not None and state.kafka.follower.caught_up.is_set():
                app_metrics.observe_terminal(job)

        view.terminal_listeners.append(observe_terminal)
        app.state.gateway = state
        connecting: asyncio.Task[None] | None = None
        try:
            try:
                state.kafka = await open_kafka_side(state)
            except BrokerError as exc:
                # Kafka unreachable, or refusing these credentials: serve unready (liveness
                # stays up; /readyz and submits answer 503 with the cause) and keep trying,
                # rather than exit into a restart loop. A wrong setting elsewhere (a topic
                # unlike the plan, a bad blob store) still stops start-up.
                log.error("not connected to Kafka: %s; serving unready, retrying", exc.detail)
                state.kafka_problem = exc.detail
                connecting = asyncio.create_task(keep_connecting(state), name="kafka-connect")
            yield
        finally:
            if connecting is not None:
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
            if state.kafka is not None:
                await state.kafka.close()
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
