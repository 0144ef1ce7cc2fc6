"""What the processor does with a micro-batch, as plain functions (no Faust, no Kafka).

`caption_batch` is synchronous (decode + inference; it runs in a worker thread) and
returns exactly one result event per job: a bad image fails only its own job.
`handle_batch` is the async orchestration the Faust agent delegates to; its state store
and result sink are Protocols, so it is tested with fakes and runs on a Faust table.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image, ImageOps

from captionstream.errors import CaptionstreamError, ImageUnreadable
from processor.captioner import Captioner
from schemas.events import (
    CaptionFailed,
    CaptionProduced,
    EventDecodeError,
    ImageSubmitted,
    JobState,
    JobStatus,
    caption_event_id,
    decode_image_submitted,
    utcnow,
)

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)

CaptionResult = CaptionProduced | CaptionFailed


def decode_rgb(data: bytes, max_pixels: int) -> PILImage:
    """Decode stored bytes to an upright RGB image, or raise `ImageUnreadable`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise ImageUnreadable(f"image has {img.width * img.height} pixels")
                return ImageOps.exif_transpose(img).convert("RGB")
    except ImageUnreadable:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageUnreadable(f"cannot decode image: {exc}") from exc


def failed(job: ImageSubmitted, error: str) -> CaptionFailed:
    return CaptionFailed(
        event_id=caption_event_id(job.job_id),
        job_id=job.job_id,
        image_ref=job.image_ref,
        error=error,
        submitted_at=job.submitted_at,
        failed_at=utcnow(),
    )


def produced(job: ImageSubmitted, caption: str, model: str) -> CaptionProduced:
    return CaptionProduced(
        event_id=caption_event_id(job.job_id),
        job_id=job.job_id,
        image_ref=job.image_ref,
        sha256=job.sha256,
        caption=caption,
        model=model,
        submitted_at=job.submitted_at,
        produced_at=utcnow(),
    )


def caption_batch(
    jobs: Sequence[ImageSubmitted],
    read_blob: Callable[[str], bytes],
    captioner: Captioner,
    max_pixels: int = 200_000_000,
) -> list[CaptionResult]:
    """Caption `jobs`; one result per job, in order. Never raises for a single bad job."""
    results: list[CaptionResult | None] = [None] * len(jobs)
    ready: list[tuple[int, PILImage]] = []
    for i, job in enumerate(jobs):
        try:
            ready.append((i, decode_rgb(read_blob(job.image_ref), max_pixels)))
        except CaptionstreamError as exc:
            results[i] = failed(job, exc.detail)
        except Exception as exc:  # an unexpected read error still fails only this job
            log.exception("reading image of job %s failed", job.job_id)
            results[i] = failed(job, f"cannot read image: {type(exc).__name__}: {exc}")
    if ready:
        try:
            captions = captioner.caption(
                [img for _, img in ready], [jobs[i].options for i, _ in ready]
            )
            for (i, _), text in zip(ready, captions, strict=True):
                results[i] = produced(jobs[i], text, captioner.name)
        except Exception:
            if len(ready) == 1:
                i, _ = ready[0]
                log.exception("captioning job %s failed", jobs[i].job_id)
                results[i] = failed(jobs[i], "captioning failed; see worker log")
            else:
                # Isolate the culprit: caption one by one so only the bad job fails.
                log.warning("batch of %d failed; retrying its jobs one by one", len(ready))
                for i, img in ready:
                    results[i] = _caption_one(jobs[i], img, captioner)
    return [r if r is not None else failed(jobs[i], "no result") for i, r in enumerate(results)]


def _caption_one(job: ImageSubmitted, img: PILImage, captioner: Captioner) -> CaptionResult:
    try:
        [text] = captioner.caption([img], [job.options])
    except Exception as exc:
        log.exception("captioning job %s failed", job.job_id)
        return failed(job, f"captioning failed: {type(exc).__name__}: {exc}")
    return produced(job, text, captioner.name)


# --- orchestration --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message from the images topic. `origin` is opaque here (the Faust event)."""

    value: bytes
    origin: Any = None


class JobStateStore(Protocol):
    def get(self, job_id: str) -> JobState | None: ...

    def put(self, state: JobState, origin: Any) -> None: ...


class ResultSink(Protocol):
    async def publish_state(self, state: JobState) -> None: ...

    async def publish_caption(self, event: CaptionResult) -> None: ...


async def handle_batch(
    deliveries: Sequence[Delivery],
    *,
    store: JobStateStore,
    sink: ResultSink,
    run_captioning: Callable[[list[ImageSubmitted]], Awaitable[list[CaptionResult]]],
) -> list[JobState]:
    """Move each job of the batch to STARTED, caption them, then to SUCCESS or FAILURE.

    Idempotent under redelivery: a job whose state is already terminal is skipped, so a
    job never gets a second, different result. Returns the final states written.
    """
    batch: list[tuple[ImageSubmitted, JobState, Any]] = []
    seen: set[str] = set()
    for delivery in deliveries:
        try:
            job = decode_image_submitted(delivery.value)
        except EventDecodeError as exc:
            log.error("dropping malformed image event: %s", exc)
            continue
        current = store.get(job.job_id)
        if job.job_id in seen or (current is not None and current.status.terminal):
            log.info("job %s already handled; skipping redelivery", job.job_id)
            continue
        seen.add(job.job_id)
        started = (current or JobState.pending(job.job_id, job.submitted_at)).advance(
            JobStatus.STARTED
        )
        store.put(started, delivery.origin)
        await sink.publish_state(started)
        batch.append((job, started, delivery.origin))
    if not batch:
        return []
    results = await run_captioning([job for job, _, _ in batch])
    finals: list[JobState] = []
    for (_job, started, origin), result in zip(batch, results, strict=True):
        if isinstance(result, CaptionProduced):
            final = started.advance(JobStatus.SUCCESS, caption=result.caption)
        else:
            final = started.advance(JobStatus.FAILURE, error=result.error)
        await sink.publish_caption(result)
        await sink.publish_state(final)
        store.put(final, origin)  # last: a crash before this means the job is redone
        finals.append(final)
    return finals
