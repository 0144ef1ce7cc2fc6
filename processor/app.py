"""Faust wiring: the app, its topics, the job table and a thin agent loop.

All behaviour lives in `processor.pipeline`; this module only connects it to Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import faust
from faust.streams import _current_event as faust_current_event

from captionstream.errors import CaptionstreamError
from captionstream.kafka import KafkaConnection
from captionstream.settings import ProcessingGuarantee, ProcessorSettings
from ingest.blobstore import BlobStore
from processor.captioner import Captioner
from processor.inference import InferenceThread
from processor.observability import ProcessorMetrics
from processor.pipeline import (
    CaptionOutcome,
    Delivery,
    RetryPolicy,
    caption_batch,
    handle_batch,
)
from processor.transport import (
    CommitGate,
    FlowSafeTableManager,
    WriteTrackingTable,
    use_transport,
)
from schemas.events import (
    CaptionFailed,
    CaptionProduced,
    EventDecodeError,
    ImageSubmitted,
    JobCancelRequested,
    JobExpiryDue,
    JobState,
    decode_job_control,
    decode_job_state,
    utcnow,
)
from schemas.topics import TOPICS, Headers

log = logging.getLogger(__name__)


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


class TableStateStore:
    """`JobStateStore` on a Faust table (rocksdb store, changelog-backed).

    Faust's rocksdb store reads and writes the partition of "the current event". In a
    batch we handle many events from several partitions, so every read and write names
    its own event: reading with another job's event in context looked in the wrong
    partition and missed (redeliveries then looked new, cancellations went unseen).
    """

    def __init__(self, table: Any, cancelled: Any) -> None:
        self.table = table
        self.cancelled = cancelled

    def get(self, job_id: str, origin: Any) -> JobState | None:
        with event_context(origin):
            raw = self.table.get(job_id.encode())
        return None if raw is None else decode_job_state(raw)

    def is_cancelled(self, job_id: str, origin: Any) -> bool:
        with event_context(origin):
            return self.cancelled.get(job_id.encode()) is not None

    def put(self, state: JobState, origin: Any) -> None:
        with event_context(origin):
            self.table[state.job_id.encode()] = state.model_dump_json().encode()


@contextlib.contextmanager
def event_context(event: Any) -> Iterator[None]:
    """Make `event` Faust's "current event" for table access, in this task only.

    Only the context variable is set, never the stream's `current_event` attribute:
    `take_events` reads that attribute to buffer the next message, so setting it (as
    `Stream._set_current_event` does) swapped buffered events: one job was processed
    twice and another never.
    """
    token = faust_current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_current_event.reset(token)


class TopicSink:
    """`ResultSink` on Faust topics; each send is awaited until the broker acked it."""

    def __init__(
        self,
        captions: faust.TopicT,
        job_state: faust.TopicT,
        retries: faust.TopicT,
        dead_letters: faust.TopicT,
        on_dead_letter: Callable[[], object] = lambda: None,
    ) -> None:
        self.captions = captions
        self.job_state = job_state
        self.retries = retries
        self.dead_letters = dead_letters
        self.on_dead_letter = on_dead_letter

    async def _send(
        self,
        topic: faust.TopicT,
        key: bytes | None,
        value: bytes | None,
        headers: dict[str, bytes] | None = None,
    ) -> None:
        fut = await topic.send(key=key, value=value, headers=headers)
        await fut

    async def forget(self, job_id: str) -> None:
        """A tombstone on the compacted job-state topic: gateways drop the job."""
        await self._send(self.job_state, job_id.encode(), None)

    async def publish_state(self, state: JobState) -> None:
        await self._send(self.job_state, state.job_id.encode(), state.model_dump_json().encode())

    async def publish_caption(self, event: CaptionProduced | CaptionFailed) -> None:
        await self._send(self.captions, event.job_id.encode(), event.model_dump_json().encode())

    async def schedule_retry(self, delivery: Delivery, not_before: datetime) -> None:
        headers = {Headers.NOT_BEFORE: not_before.isoformat().encode()}
        await self._send(self.retries, delivery.key, delivery.value, headers)

    async def dead_letter(self, delivery: Delivery, reason: str, attempts: int) -> None:
        headers = {
            Headers.REASON: reason.encode(),
            Headers.ATTEMPTS: str(attempts).encode(),
            Headers.SOURCE_TOPIC: TOPICS.images.name.encode(),
            Headers.FAILED_AT: utcnow().isoformat().encode(),
        }
        await self._send(self.dead_letters, delivery.key, delivery.value, headers)
        self.on_dead_letter()


def seconds_until_due(headers: dict[str, bytes], now: datetime) -> float:
    """How long a retry must still wait; a missing or bad header means "now"."""
    raw = headers.get(Headers.NOT_BEFORE)
    try:
        due = datetime.fromisoformat(raw.decode()) if raw else now
    except ValueError:
        return 0.0
    return max(0.0, (due - now).total_seconds())


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

    @contextlib.asynccontextmanager
    async def unit_of_work() -> Any:
        """No commit (exactly-once: no transaction commit) inside: see CommitGate.

        Table writes reach Kafka later, through Faust's send buffer: the gate opens once
        they are written (processor.transport, exactly-once 2).
        """
        if gate is None:
            yield
            return
        async with gate.hold():
            yield
            await jobs.changelog_written()
            await cancelled.changelog_written()

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )

    metrics = ProcessorMetrics()
    images = raw_topic(TOPICS.images.name)
    retries = raw_topic(TOPICS.retries.name)
    sink = TopicSink(
        captions=raw_topic(TOPICS.captions.name),
        job_state=raw_topic(TOPICS.job_state.name),
        retries=retries,
        dead_letters=raw_topic(TOPICS.dead_letters.name),
        on_dead_letter=metrics.dead_letters.inc,
    )
    policy = RetryPolicy(
        settings.max_attempts, settings.retry_backoff_s, settings.retry_backoff_max_s
    )
    jobs: WriteTrackingTable = app.Table(  # type: ignore[assignment]  # Table= above
        "jobs",
        default=None,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        options=ROCKSDB_OPTIONS,
    )
    # Job id -> when cancellation was requested. Co-partitioned with `jobs` (same key,
    # same partition count), so a worker holds the requests for the jobs it processes.
    cancelled: WriteTrackingTable = app.Table(  # type: ignore[assignment]
        "cancelled",
        default=None,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        options=ROCKSDB_OPTIONS,
    )
    control = raw_topic(TOPICS.control.name)
    caption = functools.partial(
        caption_batch,
        read_blob=metrics.timed_reads(blobs.get_sync),
        captioner=captioner,
        max_pixels=settings.max_pixels,
    )

    async def run_captioning(batch: list[ImageSubmitted]) -> list[CaptionOutcome]:
        metrics.batch_size.observe(len(batch))
        with metrics.inference_seconds.time():
            return await inference.run(caption, batch)

    @app.agent(images)
    async def caption_images(stream: Any) -> None:
        store = TableStateStore(jobs, cancelled)
        async for events in stream.take_events(
            settings.max_batch_size, within=settings.max_batch_wait_s
        ):
            deliveries = [
                Delivery(value=event.value, origin=event, key=event.key) for event in events
            ]
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
        """Cancellation requests are remembered (the captioning agent honours them for
        jobs it has not started); expiries delete the job's state everywhere, and its
        image unless a newer job uses it."""
        async for event in stream.events():
            try:
                request = decode_job_control(event.value)
            except EventDecodeError as exc:
                log.error("ignoring a malformed job-control request: %s", exc)
                continue
            key = request.job_id.encode()
            if isinstance(request, JobCancelRequested):
                cancelled[key] = request.requested_at.isoformat().encode()
                log.info("job %s: cancellation requested", request.job_id)
                continue
            async with unit_of_work():
                if jobs.get(key) is None:
                    continue  # already expired (the janitor may ask twice)
                del jobs[key]
                if cancelled.get(key) is not None:
                    del cancelled[key]
                await sink.forget(request.job_id)
            if request.image_ref is not None:
                try:
                    await asyncio.to_thread(
                        blobs.delete_if_idle_sync, request.image_ref, settings.job_ttl_s
                    )
                except CaptionstreamError as exc:  # an object store down: not the agent's end
                    log.warning("job %s: image not deleted: %s", request.job_id, exc.detail)
            log.info("job %s expired and deleted", request.job_id)

    @app.timer(interval=settings.janitor_interval_s)  # type: ignore[untyped-decorator]
    async def find_expired_jobs(*_: Any) -> None:  # Faust passes the app to timers
        """Ask, through the job-control topic, to delete this worker's jobs that finished
        more than job_ttl_s ago (the request's partition is the job's, so the deletion
        runs where Faust can write the tables)."""
        now = utcnow()
        cutoff = now - timedelta(seconds=settings.job_ttl_s)
        for key, raw in list(jobs.items()):
            state = decode_job_state(raw)
            if state.finished_at is not None and state.finished_at < cutoff:
                due = JobExpiryDue(job_id=state.job_id, image_ref=state.image_ref, due_at=now)
                value = due.model_dump_json().encode()
                if exactly_once:
                    # Outside any transaction: one on an idle partition would stay open
                    # (no offsets to commit it with) until the broker aborts it. A
                    # request sent twice is harmless (the deletion checks the table).
                    await app.producer.send_and_wait(
                        control.get_topic_name(), key, value, None, None, None
                    )
                else:
                    await control.send(key=key, value=value)

    @app.agent(retries)
    async def release_retries(stream: Any) -> None:
        """Hold each retry until it is due, then put it back on the images topic.

        Waiting here never blocks captioning (another agent) nor heartbeats (it is an
        await, not a sleep in a thread); delays are capped by retry_backoff_max_s.
        """
        async for event in stream.events():
            delay = seconds_until_due(event.headers, utcnow())
            if delay:
                await asyncio.sleep(delay)
            async with unit_of_work():
                fut = await images.send(key=event.key, value=event.value)
                await fut

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def measure_lag(*_: Any) -> None:  # Faust passes the app to timers
        for tp in app.consumer.assignment():
            if tp.topic == TOPICS.images.name:
                position = await app.consumer.position(tp)
                # No high watermark until the partition's first fetch response (a just
                # assigned partition): no figure then, rather than a crashed worker.
                highwater = app.consumer.highwater(tp)
                if position is not None and highwater is not None:
                    lag = max(0, highwater - position)
                    metrics.consumer_lag.labels(str(tp.partition)).set(lag)

    started = asyncio.Event()

    @app.task  # type: ignore[untyped-decorator]
    async def mark_started() -> None:
        started.set()

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        """Ready: model loaded (before the app exists), worker started, not rebalancing
        and not restoring tables."""
        checks = {
            "model": captioner.name,
            "started": started.is_set(),
            "rebalancing": bool(app.rebalancing),
            "recovering": bool(getattr(app, "in_recovery", False)),
        }
        ready = checks["started"] and not checks["rebalancing"] and not checks["recovering"]
        if ready:
            return web.json({"status": "ready", "checks": checks})
        return web.json({"detail": "not ready", "checks": checks}, status=503)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        body, content_type = metrics.exposition()
        # aiohttp sets the charset itself and refuses one inside content_type.
        params = [p for p in content_type.split(";") if "charset" not in p]
        return web.bytes(body, content_type=";".join(params).strip())

    return ProcessorApp(app=app, images=images, metrics=metrics)
