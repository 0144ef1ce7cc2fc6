"""Turning an image into an accepted job: validate, store, publish.

Shared by the HTTP gateway and the bulk-ingest path. The publisher is a Protocol, so this
logic is tested with a fake and runs in production on Kafka.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from captionstream.ingest.blobstore import BlobStore
from captionstream.ingest.validation import ImageLimits, validate_image
from captionstream.schemas.events import (
    CaptionProduced,
    GenerationOptions,
    ImageSubmitted,
    JobState,
    JobStatus,
    caption_cache_key,
    caption_event_id,
    utcnow,
)


class JobPublisher(Protocol):
    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        """Publish the PENDING state, then the image event; raise if either fails (the
        job was not accepted). PENDING first keeps each job's states in order on the
        compacted job-state topic (ingest.kafka_publishing says why)."""
        ...


class CaptionCache(Protocol):
    """Captions already made, by `caption_cache_key` (image content + options)."""

    def lookup(self, cache_key: str) -> JobState | None:
        """A SUCCESS state for the key, or None."""
        ...

    async def publish_hit(self, state: JobState, event: CaptionProduced) -> None:
        """Record a job answered from the cache: its caption event and SUCCESS state."""
        ...


# Job ids of idempotent submissions are derived from the key, so that replicas racing
# on one key publish the same job id and the job-state log (keyed by job id) decides.
_IDEMPOTENT_JOB_NAMESPACE = uuid.UUID("7d0f3e0c-5b1a-4c1e-9a57-2f6a4f5b8e31")


def new_job_id(idempotency_key: str | None = None) -> str:
    """A fresh random id, or with an `Idempotency-Key` the id every submission with
    that key gets, on any replica."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    return uuid.uuid5(_IDEMPOTENT_JOB_NAMESPACE, idempotency_key).hex


async def submit_image(
    data: bytes,
    filename: str | None,
    *,
    limits: ImageLimits,
    blobs: BlobStore,
    publisher: JobPublisher,
    options: GenerationOptions | None = None,
    idempotency_key: str | None = None,
    request_digest: str | None = None,
    cache: CaptionCache | None = None,
    webhook_url: str | None = None,
) -> tuple[JobState, ImageSubmitted]:
    """Accept one image as a job. Raises `ImageRejected` for bad input, before any I/O.

    With a `cache` that knows the caption of the same content with the same options, the
    job is answered at once (state SUCCESS, `cached_from` set) and the model never runs.
    """
    image = await validate_image(data, filename, limits)
    options = options or GenerationOptions()
    hit = cache.lookup(caption_cache_key(image.sha256, options)) if cache is not None else None
    if hit is not None and (hit.caption is None or hit.image_ref is None):
        hit = None
    # A hit never runs the model, so its bytes are not stored again: storing refreshes
    # the blob's last use, and the job that made the caption would then find the blob
    # "in use" when it expires, while no job left would ever delete it.
    ref = hit.image_ref if hit is not None else None
    if ref is None:
        ref = await blobs.put(image.data, image.sha256, image.extension)
    event = ImageSubmitted(
        job_id=new_job_id(idempotency_key),
        image_ref=ref,
        content_type=image.content_type,
        size_bytes=image.size_bytes,
        width=image.width,
        height=image.height,
        sha256=image.sha256,
        submitted_at=utcnow(),
        options=options,
        idempotency_key=idempotency_key,
        request_digest=request_digest,
        webhook_url=webhook_url,
    )
    state = JobState.submitted(event)
    if cache is not None and hit is not None:
        state = state.advance(
            JobStatus.SUCCESS, caption=hit.caption, model=hit.model, cached_from=hit.job_id
        )
        await cache.publish_hit(state, cached_caption_event(event, state))
        return state, event
    await publisher.publish_submission(state, event)
    return state, event


def cached_caption_event(job: ImageSubmitted, state: JobState) -> CaptionProduced:
    """The public caption event of a job answered from the cache."""
    return CaptionProduced(
        event_id=caption_event_id(job.job_id, job.submitted_at),
        job_id=job.job_id,
        image_ref=job.image_ref,
        sha256=job.sha256,
        caption=state.caption or "",
        model=state.model or "unknown",
        submitted_at=job.submitted_at,
        produced_at=state.updated_at,
    )
