"""The processor's Prometheus metrics and its /healthz, /readyz and /metrics pages.

Pages are served by Faust's own web server, on CAPTIONSTREAM_METRICS_PORT (off when
unset, so several workers on one host need no port planning unless scraped).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from captionstream.observability import END_TO_END_BUCKETS
from captionstream.schemas.events import JobState

T = TypeVar("T")
R = TypeVar("R")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
INFERENCE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BLOB_READ_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ProcessorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.batch_size = Histogram(
            "captionstream_processor_batch_size",
            "Jobs per micro-batch handed to the captioner.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "captionstream_processor_inference_seconds",
            "Wall time to decode and caption one micro-batch.",
            buckets=INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.blob_read_seconds = Histogram(
            "captionstream_processor_blob_read_seconds",
            "Time to read one image from the blob store (a local file, or an object-store "
            "GET: its latency is part of every batch).",
            buckets=BLOB_READ_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Counter(
            "captionstream_processor_jobs",
            "Jobs leaving a processing attempt, by the status they left in.",
            ["status"],
            registry=self.registry,
        )
        self.end_to_end_seconds = Histogram(
            "captionstream_processor_end_to_end_seconds",
            "Submission to terminal state, for jobs finished by this worker.",
            buckets=END_TO_END_BUCKETS,
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "captionstream_processor_dead_letters",
            "Messages sent to the dead-letter topic.",
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "captionstream_processor_consumer_lag",
            "Image events not yet read, per assigned partition of the images topic.",
            ["partition"],
            registry=self.registry,
        )

    def timed_reads(self, read: Callable[[str], bytes]) -> Callable[[str], bytes]:
        """`read`, observed in blob_read_seconds (it runs on the inference thread)."""

        def read_observed(ref: str) -> bytes:
            with self.blob_read_seconds.time():
                return read(ref)

        return read_observed

    def timed_batches(
        self, run: Callable[[list[T]], Awaitable[R]]
    ) -> Callable[[list[T]], Awaitable[R]]:
        """`run` (a micro-batch's captioning), observed in batch_size and
        inference_seconds."""

        async def run_observed(batch: list[T]) -> R:
            self.batch_size.observe(len(batch))
            with self.inference_seconds.time():
                return await run(batch)

        return run_observed

    def observe_finals(self, finals: Sequence[JobState]) -> None:
        for state in finals:
            self.jobs.labels(state.status.value).inc()
            if state.status.terminal and state.finished_at is not None:
                seconds = (state.finished_at - state.submitted_at).total_seconds()
                self.end_to_end_seconds.observe(max(0.0, seconds))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def page(self) -> tuple[bytes, str]:
        """The /metrics body and content type for Faust's web server: aiohttp sets the
        charset itself and refuses one inside the content type."""
        body, content_type = self.exposition()
        params = [p for p in content_type.split(";") if "charset" not in p]
        return body, ";".join(params).strip()


class PartitionPositions(Protocol):
    """What lag needs of a Faust consumer."""

    def assignment(self) -> Iterable[Any]: ...  # TPs: .topic, .partition

    async def position(self, tp: Any) -> int | None: ...

    def highwater(self, tp: Any) -> int | None: ...


async def record_consumer_lag(consumer: PartitionPositions, topic: str, lag: Gauge) -> None:
    """Set `lag` (labelled by partition) for each assigned partition of `topic`.

    No high watermark until the partition's first fetch response (a just assigned
    partition): no figure then, rather than a crashed worker.
    """
    for tp in consumer.assignment():
        if tp.topic != topic:
            continue
        position = await consumer.position(tp)
        highwater = consumer.highwater(tp)
        if position is not None and highwater is not None:
            lag.labels(str(tp.partition)).set(max(0, highwater - position))


def readiness(
    model: str, *, started: bool, rebalancing: bool, recovering: bool
) -> tuple[int, dict[str, Any]]:
    """The /readyz status and body: ready once the worker started (the model loaded
    before the app existed) and while it is neither rebalancing nor restoring tables."""
    checks = {
        "model": model,
        "started": started,
        "rebalancing": rebalancing,
        "recovering": recovering,
    }
    if started and not rebalancing and not recovering:
        return 200, {"status": "ready", "checks": checks}
    return 503, {"detail": "not ready", "checks": checks}
