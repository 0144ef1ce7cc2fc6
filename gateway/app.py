"""The FastAPI application: resources are created in the lifespan and live on app.state."""

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

from captionstream.errors import CaptionstreamError
from captionstream.kafka import KafkaConnection, ensure_topics, own_topics
from captionstream.settings import GatewaySettings
from gateway.body_limit import MULTIPART_OVERHEAD_BYTES, BodySizeLimitMiddleware
from gateway.metrics import GatewayMetrics, HttpMetricsMiddleware
from gateway.publisher import KafkaCaptionCache, KafkaJobPublisher
from gateway.readiness import Readiness
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


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        allow_pixels(settings.max_pixels)
        # A blob store that cannot be used fails start-up first, saying what to change.
        blobs = open_blob_store(settings)
        await asyncio.to_thread(blobs.check)
        kafka = KafkaConnection.from_settings(settings, "gateway")
        await ensure_topics(
            kafka, own_topics(settings.partitions), replication_factor=settings.replication_factor
        )
        # A submit waits at most kafka_timeout_s for Kafka before answering 503.
        producer = kafka.producer(request_timeout_s=settings.kafka_timeout_s)
        await producer.start()
        view = JobView()
        follower = JobStateFollower(view, kafka, TOPICS.job_state.name)
        app_metrics = GatewayMetrics(view)

        def observe_terminal(state: JobState) -> None:
            # Only live completions: states replayed while rebuilding the view finished
            # long ago and were already counted by the replica that saw them happen.
            if follower.caught_up.is_set():
                app_metrics.observe_terminal(state)

        view.terminal_listeners.append(observe_terminal)
        fetcher = ImageFetcher(FetchPolicy.from_settings(settings))
        webhook_guard = WebhookGuard(settings)
        dispatcher: WebhookDispatcher | None = None
        sweeper: asyncio.Task[None] | None = None
        try:
            await follower.start(settings.view_catch_up_timeout_s)
            app.state.settings = settings
            app.state.view = view
            app.state.metrics = app_metrics
            app.state.follower = follower
            app.state.publisher = KafkaJobPublisher(producer)
            app.state.cache = KafkaCaptionCache(view, producer) if settings.caption_cache else None
            app.state.readiness = Readiness(producer.client, follower, settings.readiness_timeout_s)
            app.state.blobs = blobs
            app.state.fetcher = fetcher
            app.state.limits = ImageLimits.from_settings(settings)
            app.state.webhooks = webhook_guard
            if settings.webhooks_enabled:
                sender = WebhookSender(settings, webhook_guard, app_metrics)
                dispatcher = WebhookDispatcher(settings, kafka, TOPICS.job_state.name, sender)
                await dispatcher.start()
            else:
                log.info("webhooks off (CAPTIONSTREAM_WEBHOOK_SECRET is not set)")
            sweeper = asyncio.create_task(
                sweep_expired_jobs(view, app.state.publisher, settings), name="ttl-sweep"
            )
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            if dispatcher is not None:
                await dispatcher.stop()
            await fetcher.aclose()
            await follower.stop()
            await producer.stop()
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
