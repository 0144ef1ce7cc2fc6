"""Turning an image into an accepted job: validate, store, publish.

Shared by the HTTP gateway and the bulk-ingest path. The publisher is a Protocol, so this
logic is tested with a fake and runs in production on Kafka.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from ingest.blobstore import BlobStore
from ingest.validation import ImageLimits, validate_image
from schemas.events import GenerationOptions, ImageSubmitted, JobState, utcnow


class JobPublisher(Protocol):
    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        """Publish the image event (raising if it fails: the job was not accepted), then
        make the PENDING state visible to every gateway (best effort)."""
        ...


def new_job_id() -> str:
    return uuid.uuid4().hex


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
) -> tuple[JobState, ImageSubmitted]:
    """Accept one image as a job. Raises `ImageRejected` for bad input, before any I/O."""
    image = await validate_image(data, filename, limits)
    ref = await blobs.put(image.data, image.sha256, image.extension)
    submitted_at = utcnow()
    event = ImageSubmitted(
        job_id=new_job_id(),
        image_ref=ref,
        content_type=image.content_type,
        size_bytes=image.size_bytes,
        width=image.width,
        height=image.height,
        sha256=image.sha256,
        submitted_at=submitted_at,
        options=options or GenerationOptions(),
        idempotency_key=idempotency_key,
        request_digest=request_digest,
    )
    state = JobState.submitted(event)
    await publisher.publish_submission(state, event)
    return state, event
