"""Faust wiring: the app, its topics, its tables, and agents and timers that are thin
loops.

Behaviour lives elsewhere, as plain functions tested without a broker: batches in
`processor.pipeline`, cancellation and expiry in `processor.job_control`, metrics and
readiness in `processor.observability`; the ports on Faust in `processor.faust_adapters`
and the transport in `processor.transport`.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

from captionstream.ingest.blobstore import BlobStore
from captionstream.kafka import KafkaConnection
from captionstream.processor.captioner import Captioner
from captionstream.processor.faust_adapters import (
    ControlRequestSender,
    TableStateStore,
    TopicSink,
    send_acked,
)
from captionstream.processor.inference import InferenceThread
from captionstream.processor.job_control import JobControlHandler, request_expiries
from captionstream.processor.observability import ProcessorMetrics, readiness, record_consumer_lag
from captionstream.processor.pipeline import (
    Delivery,
    RetryPolicy,
    caption_batch,
    handle_batch,
    seconds_until_due,
)
from captionstream.processor.transport import (
    CommitGate,
    FlowSafeTableManager,
    UnitOfWork,
    WriteTrackingTable,
    use_transport,
)
from captionstream.schemas.events import utcnow
from captionstream.schemas.topics import TOPICS
from captionstream.settings import ProcessingGuarantee, ProcessorSettings

# Job states are a few hundred bytes each: Faust's rocksdb defaults (64 MiB write
# buffers x 3 per partition, a 2 GiB block cache) would let a worker's memory grow by
# hundreds of MiB for no benefit.
ROCKSDB_OPTIONS = {
    "driver": "rocksdict",
    "write_buffer_size": 4 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "block_cache_size": 16 * 1024 * 1024,
    "block_cache_compressed_size": 4 * 1024 * 1024,
}


@dataclass
class ProcessorApp:
    app: faust.App
    images: faust.TopicT
    metrics: ProcessorMetrics


def create_app(
    settings: ProcessorSettings,
    captioner: Captioner,
    blobs: BlobStore,
    datadir: Path,
    inference: InferenceThread,
    kafka: KafkaConnection,
) -> ProcessorApp:
    """Wire the worker's Faust app. `inference` is the thread the captioner was loaded
    on; every batch runs there too (see processor.inference for why it must be one).
    Every topic it uses exists before it starts (`captionstream.kafka.topics`).

    Exactly-once: every batch's captions, job states, retries, dead letters and table
    writes commit atomically with its input offsets, one transaction per partition
    (processor.transport); tables are in memory, rebuilt from the committed changelog.
    """
    exactly_once = settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
    gate = CommitGate() if exactly_once else None
    app = faust.App(
        settings.group_id,
        **kafka.faust_settings(),
        processing_guarantee=settings.processing_guarantee.value,
        store="memory://" if exactly_once else "rocksdb://",
        # A standby replica would keep a lost partition's uncommitted writes (see
        # processor.transport, exactly-once 3); in memory, recovery is quick anyway.
        table_standby_replicas=0 if exactly_once else 1,
        datadir=str(datadir),
        TableManager=FlowSafeTableManager,
        Table=WriteTrackingTable,
        topic_partitions=settings.partitions,
        # The topic plan creates and checks every topic, Faust's own included: a worker
        # needs no right to create topics, and nothing is created behind the plan's back.
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        # Faust's web server carries /healthz, /readyz and /metrics, when a port is set.
        web_enabled=settings.metrics_port is not None,
        web_port=settings.metrics_port or 6066,
        web_bind=settings.metrics_host,
        # Keys are job ids as plain UTF-8 and values our own JSON, on topics and the table
        # alike: Faust's key encoding can never route a job differently than the gateway.
        key_serializer="raw",
        value_serializer="raw",
    )
    use_transport(app, kafka, gate)

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )

    def job_table(name: str) -> WriteTrackingTable:
        table: WriteTrackingTable = app.Table(  # type: ignore[assignment]  # Table= above
            name,
            default=None,
            partitions=settings.partitions,
            key_type=bytes,
            value_type=bytes,
            options=ROCKSDB_OPTIONS,
        )
        return table

    metrics = ProcessorMetrics()
    images = raw_topic(TOPICS.images.name)
    retries = raw_topic(TOPICS.retries.name)
    control = raw_topic(TOPICS.control.name)
    sink = TopicSink(
        captions=raw_topic(TOPICS.captions.name),
        job_state=raw_topic(TOPICS.job_state.name),
        retries=retries,
        dead_letters=raw_topic(TOPICS.dead_letters.name),
        on_dead_letter=metrics.dead_letters.inc,
    )
    jobs = job_table("jobs")
    # Job id -> when cancellation was requested. Co-partitioned with `jobs` (same key,
    # same partition count), so a worker holds the requests for the jobs it processes.
    cancelled = job_table("cancelled")
    unit_of_work = UnitOfWork(gate, [jobs, cancelled])
    store = TableStateStore(jobs, cancelled)
    policy = RetryPolicy(
        settings.max_attempts, settings.retry_backoff_s, settings.retry_backoff_max_s
    )
    caption = functools.partial(
        caption_batch,
        read_blob=metrics.timed_reads(blobs.get_sync),
        captioner=captioner,
        max_pixels=settings.max_pixels,
    )
    run_captioning = metrics.timed_batches(functools.partial(inference.run, caption))
    job_control = JobControlHandler(
        jobs=jobs,
        cancelled=cancelled,
        publish_tombstone=sink.forget,
        blobs=blobs,
        job_ttl_s=settings.job_ttl_s,
        unit_of_work=unit_of_work,
    )
    send_control = ControlRequestSender(app, control, exactly_once=exactly_once)

    @app.agent(images)
    async def caption_images(stream: Any) -> None:
        async for events in stream.take_events(
            settings.max_batch_size, within=settings.max_batch_wait_s
        ):
            deliveries = [Delivery(value=e.value, origin=e, key=e.key) for e in events]
            async with unit_of_work():
                finals = await handle_batch(
                    deliveries,
                    store=store,
                    sink=sink,
                    run_captioning=run_captioning,
                    policy=policy,
                )
            metrics.observe_finals(finals)

    @app.agent(control)
    async def handle_job_control(stream: Any) -> None:
        """Faust makes each request the current event: its partition is its job's, so
        the handler reads and writes the job's tables there."""
        async for event in stream.events():
            await job_control.handle(event.value)

    @app.timer(interval=settings.janitor_interval_s)  # type: ignore[untyped-decorator]
    async def find_expired_jobs(*_: Any) -> None:  # Faust passes the app to timers
        await request_expiries(jobs, now=utcnow(), ttl_s=settings.job_ttl_s, send=send_control)

    @app.agent(retries)
    async def release_retries(stream: Any) -> None:
        """Hold each retry until it is due, then put it back on the images topic.

        Waiting here never blocks captioning (another agent) nor heartbeats (it is an
        await, not a sleep in a thread); delays are capped by retry_backoff_max_s.
        """
        async for event in stream.events():
            if delay := seconds_until_due(event.headers, utcnow()):
                await asyncio.sleep(delay)
            async with unit_of_work():
                await send_acked(images, event.key, event.value)

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def measure_lag(*_: Any) -> None:  # Faust passes the app to timers
        await record_consumer_lag(app.consumer, TOPICS.images.name, metrics.consumer_lag)

    started = asyncio.Event()

    @app.task  # type: ignore[untyped-decorator]
    async def mark_started() -> None:
        started.set()

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        status, body = readiness(
            captioner.name,
            started=started.is_set(),
            rebalancing=bool(app.rebalancing),
            recovering=bool(getattr(app, "in_recovery", False)),
        )
        return web.json(body, status=status)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        body, content_type = metrics.page()
        return web.bytes(body, content_type=content_type)

    return ProcessorApp(app=app, images=images, metrics=metrics)
