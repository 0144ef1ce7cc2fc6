"""What the processor does with a micro-batch, as plain functions (no Faust, no Kafka).

`caption_batch` is synchronous (decode + inference; it runs in a worker thread) and
returns exactly one outcome per job: a bad image fails only its own job.
`handle_batch` is the async orchestration the Faust agent delegates to; its state store
and result sink are Protocols, so it is tested with fakes and runs on a Faust table.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from PIL import ExifTags, Image, UnidentifiedImageError

from captionstream.errors import CaptionstreamError, ImageUnreadable
from captionstream.ingest.validation import DECODERS, MAX_SIDE
from captionstream.logging_config import job_context
from captionstream.processor.captioner import Captioner
from captionstream.schemas.events import (
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
from captionstream.schemas.topics import Headers

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)


# EXIF orientation -> the transpose that shows the picture upright (as in Pillow's
# `ImageOps.exif_transpose`, which also rewrites the EXIF and fails on odd tags).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_rgb(data: bytes, max_pixels: int, draft_to: tuple[int, int] | None = None) -> PILImage:
    """Decode stored bytes to an upright RGB image, or raise `ImageUnreadable`.

    Only what the gateway accepts is decoded: its trusted decoders, at most `max_pixels`
    pixels and `MAX_SIDE` a side, and the first frame of an animation or a multi-page
    file. The EXIF orientation is applied so the captioner sees the picture upright;
    EXIF that cannot be read leaves the picture as stored rather than failing a
    readable image.

    With `draft_to` (the model's input size), a JPEG is decoded at 1/2, 1/4 or 1/8 scale
    by its own decoder where the result stays at least that large on both sides: the
    model shrinks the picture to its input size anyway, and a phone photo then decodes
    and resizes several times faster. Other formats decode at full size.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow on odd metadata
            with Image.open(io.BytesIO(data), formats=DECODERS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageUnreadable(
                        f"image is {width}x{height} = {width * height} pixels; "
                        f"the limit is {max_pixels}"
                    )
                if max(width, height) > MAX_SIDE:
                    raise ImageUnreadable(
                        f"image is {width}x{height}; no side may be longer than {MAX_SIDE}"
                    )
                if draft_to is not None:
                    img.draft(None, draft_to)  # JPEG only; a no-op for other formats
                rgb = img.convert("RGB")
                try:
                    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
                except Exception:  # unreadable EXIF: the picture as stored
                    orientation = 1
    except ImageUnreadable:
        raise
    except UnidentifiedImageError as exc:
        raise ImageUnreadable("cannot decode image: not a supported image format") from exc
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageUnreadable(f"cannot decode image: {exc}") from exc
    transpose = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return rgb if transpose is None else rgb.transpose(transpose)


@dataclass(frozen=True, slots=True)
class JobFailure:
    """Captioning one job failed; `retriable` says whether another attempt may succeed."""

    job: ImageSubmitted
    error: str
    retriable: bool


CaptionOutcome = CaptionProduced | JobFailure


def failure_of(job: ImageSubmitted, exc: BaseException) -> JobFailure:
    """Policy is read off the exception: our errors say if they are `retriable`; any
    other exception (a model or I/O hiccup) is assumed transient and retried."""
    if isinstance(exc, CaptionstreamError):
        return JobFailure(job, exc.detail, exc.retriable)
    return JobFailure(job, f"{type(exc).__name__}: {exc}", retriable=True)


def failed_event(job: ImageSubmitted, error: str) -> CaptionFailed:
    return CaptionFailed(
        event_id=caption_event_id(job.job_id, job.submitted_at),
        job_id=job.job_id,
        image_ref=job.image_ref,
        error=error,
        submitted_at=job.submitted_at,
        failed_at=utcnow(),
    )


def produced(job: ImageSubmitted, caption: str, model: str) -> CaptionProduced:
    return CaptionProduced(
        event_id=caption_event_id(job.job_id, job.submitted_at),
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
) -> list[CaptionOutcome]:
    """Caption `jobs`; one outcome per job, in order. Never raises for a single bad job."""
    results: list[CaptionOutcome | None] = [None] * len(jobs)
    ready: list[tuple[int, PILImage]] = []
    draft_to = getattr(captioner, "input_size", None)  # optional in the protocol
    for i, job in enumerate(jobs):
        try:
            ready.append((i, decode_rgb(read_blob(job.image_ref), max_pixels, draft_to)))
        except Exception as exc:  # one unreadable image fails only its own job
            results[i] = failure_of(job, exc)
    if ready:
        try:
            captions = captioner.caption(
                [img for _, img in ready], [jobs[i].options for i, _ in ready]
            )
            for (i, _), text in zip(ready, captions, strict=True):
                results[i] = produced(jobs[i], text, captioner.name)
        except Exception as exc:
            if len(ready) == 1:
                i, _ = ready[0]
                log.warning(
                    "captioning job %s failed: %r",
                    jobs[i].job_id,
                    exc,
                    extra=job_context(jobs[i].job_id),
                )
                results[i] = failure_of(jobs[i], exc)
            else:
                # Isolate the culprit: caption one by one so only the bad job fails.
                log.warning("batch of %d failed (%r); retrying one by one", len(ready), exc)
                for i, img in ready:
                    results[i] = _caption_one(jobs[i], img, captioner)
    return [
        r if r is not None else JobFailure(jobs[i], "no result", retriable=True)
        for i, r in enumerate(results)
    ]


def _caption_one(job: ImageSubmitted, img: PILImage, captioner: Captioner) -> CaptionOutcome:
    try:
        [text] = captioner.caption([img], [job.options])
    except Exception as exc:
        log.warning("captioning job %s failed: %r", job.job_id, exc, extra=job_context(job.job_id))
        return failure_of(job, exc)
    return produced(job, text, captioner.name)


# --- orchestration --------------------------------------------------------------------


CANCELLED = "cancelled at the client's request before it started"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: attempt n (1-based) that failed waits base * 2**(n-1), capped."""

    max_attempts: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0

    def delay_after(self, attempt: int) -> float:
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))


def seconds_until_due(headers: Mapping[str, bytes], now: datetime) -> float:
    """How long a retry (`ResultSink.schedule_retry`'s record) must still wait; a missing
    or bad due time means "now"."""
    raw = headers.get(Headers.NOT_BEFORE)
    try:
        due = datetime.fromisoformat(raw.decode()) if raw else now
    except ValueError:
        return 0.0
    return max(0.0, (due - now).total_seconds())


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message from the images topic. `origin` is opaque here (the Faust event)."""

    value: bytes | None
    origin: Any = None
    key: bytes | None = None


class JobStateStore(Protocol):
    # `origin` is the delivery the job came in: a Faust table reads (and writes) the
    # partition of the event it is told about.
    def get(self, job_id: str, origin: Any) -> JobState | None: ...

    def is_cancelled(self, job_id: str, origin: Any) -> bool:
        """Whether a client asked to cancel the job (honoured only before it starts)."""
        ...

    def put(self, state: JobState, origin: Any) -> None: ...


class ResultSink(Protocol):
    async def publish_state(self, state: JobState) -> None: ...

    async def publish_caption(self, event: CaptionProduced | CaptionFailed) -> None: ...

    async def schedule_retry(self, delivery: Delivery, not_before: datetime) -> None:
        """Send the image event back through the retry topic, due at `not_before`."""
        ...

    async def dead_letter(self, delivery: Delivery, reason: str, attempts: int) -> None:
        """Park the original message on the dead-letter topic with the reason."""
        ...


async def handle_batch(
    deliveries: Sequence[Delivery],
    *,
    store: JobStateStore,
    sink: ResultSink,
    run_captioning: Callable[[list[ImageSubmitted]], Awaitable[list[CaptionOutcome]]],
    policy: RetryPolicy | None = None,
) -> list[JobState]:
    """Move each job of the batch to STARTED, caption them, then to SUCCESS, RETRY or
    FAILURE.

    Idempotent under redelivery: a job whose state is already terminal is skipped, so a
    job never gets a second, different result. A malformed message goes to the
    dead-letter topic. Returns the states written last, one per job handled.
    """
    policy = policy or RetryPolicy()
    finals: list[JobState] = []
    batch: list[tuple[ImageSubmitted, JobState, Delivery]] = []
    seen: set[str] = set()
    for delivery in deliveries:
        try:
            job = decode_image_submitted(delivery.value)
        except EventDecodeError as exc:
            log.error("dead-lettering a malformed image event: %s", exc)
            await sink.dead_letter(delivery, f"malformed event: {exc}", attempts=0)
            continue
        current = store.get(job.job_id, delivery.origin)
        if current is not None and current.finished_at and job.submitted_at > current.finished_at:
            current = None  # a new job under an expired one's id (its Idempotency-Key reused)
        if job.job_id in seen or (current is not None and current.status.terminal):
            log.info(
                "job %s already handled; skipping redelivery",
                job.job_id,
                extra=job_context(job.job_id),
            )
            continue
        seen.add(job.job_id)
        if current is not None and current.request_digest != job.request_digest:
            # Two gateway replicas raced on one Idempotency-Key with different requests;
            # both published the key's job id, and the first event on the log won.
            reason = (
                "conflicting submission: the job's Idempotency-Key was used for another request"
            )
            log.warning("job %s: %s", job.job_id, reason, extra=job_context(job.job_id))
            await sink.dead_letter(delivery, reason, attempts=0)
            continue
        if (current is None or current.attempts == 0) and store.is_cancelled(
            job.job_id, delivery.origin
        ):
            cancelled = (current or JobState.submitted(job)).advance(
                JobStatus.FAILURE, error=CANCELLED
            )
            await sink.publish_caption(failed_event(job, CANCELLED))
            await sink.publish_state(cancelled)
            store.put(cancelled, delivery.origin)
            finals.append(cancelled)
            continue
        started = (current or JobState.submitted(job)).advance(JobStatus.STARTED, error=None)
        store.put(started, delivery.origin)
        await sink.publish_state(started)
        batch.append((job, started, delivery))
    if not batch:
        return finals
    outcomes = await run_captioning([job for job, _, _ in batch])
    for (job, started, delivery), outcome in zip(batch, outcomes, strict=True):
        if isinstance(outcome, CaptionProduced):
            final = started.advance(JobStatus.SUCCESS, caption=outcome.caption, model=outcome.model)
            await sink.publish_caption(outcome)
        elif outcome.retriable and started.attempts < policy.max_attempts:
            delay = policy.delay_after(started.attempts)
            final = started.advance(JobStatus.RETRY, error=outcome.error)
            await sink.schedule_retry(delivery, utcnow() + timedelta(seconds=delay))
        else:
            error = outcome.error
            if outcome.retriable:
                error = f"{error} (gave up after {started.attempts} attempts)"
            final = started.advance(JobStatus.FAILURE, error=error)
            await sink.publish_caption(failed_event(job, error))
            await sink.dead_letter(delivery, error, attempts=started.attempts)
        await sink.publish_state(final)
        store.put(final, delivery.origin)  # last: a crash before this means a redo
        finals.append(final)
        if final.status is JobStatus.SUCCESS:
            log.info("job %s captioned", job.job_id, extra=job_context(job.job_id))
        else:
            log.warning(
                "job %s %s: %s",
                job.job_id,
                final.status.value,
                final.error,
                extra=job_context(job.job_id),
            )
    return finals
