"""Events carried on Kafka topics, version 1.

Every event is a JSON object with `type` and `schema_version`, so a consumer can reject
what it does not understand instead of misreading it. Events carry image *references*,
never image bytes: Kafka stays small and fast, and the blob store owns the bytes.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION: Literal[1] = 1
WEBHOOK_URL_MAX_LENGTH = 2048

# Namespace for deterministic event ids: a redelivered job yields the same event id, so
# downstream consumers can drop duplicates.
_EVENT_NAMESPACE = uuid.UUID("6f1c1a1e-4c55-4a8e-9b1e-63a9a4f0c0de")


def utcnow() -> datetime:
    return datetime.now(UTC)


def caption_cache_key(sha256: str, options: GenerationOptions) -> str:
    """Jobs with the same image content and the same options get the same caption."""
    return hashlib.sha256(f"{sha256}\0{options.model_dump_json()}".encode()).hexdigest()


def caption_event_id(job_id: str, submitted_at: datetime) -> str:
    """The id of the (single) result event of a job: stable across redeliveries, and new
    for a new job under a reused id (an `Idempotency-Key` sent again after its job
    expired), which consumers dropping duplicates by event id must not drop."""
    submitted = submitted_at.astimezone(UTC).isoformat(timespec="microseconds")
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{job_id}/{submitted}/result"))


class EventDecodeError(ValueError):
    """Bytes on a topic that are not a valid event of the expected kind and version."""


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: Literal[1] = SCHEMA_VERSION


class GenerationOptions(BaseModel):
    """Per-job text generation options; `None` means the worker's default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int | None = Field(default=None, ge=1, le=200)
    num_beams: int | None = Field(default=None, ge=1, le=8)
    prompt: str | None = Field(
        default=None, max_length=200, description="Conditional-caption prefix."
    )


class ImageSubmitted(_Event):
    """A job was accepted: caption the image behind `image_ref`."""

    type: Literal["image.submitted"] = "image.submitted"
    job_id: str
    image_ref: str = Field(
        description="URI of the stored image, e.g. file:///data/blobs/ab/ab12.png"
    )
    content_type: str = Field(examples=["image/png"])
    size_bytes: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    submitted_at: datetime
    options: GenerationOptions = GenerationOptions()
    idempotency_key: str | None = Field(
        default=None, max_length=200, description="The client's Idempotency-Key, if any."
    )
    request_digest: str | None = Field(
        default=None, description="Digest of the request that created the job."
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=WEBHOOK_URL_MAX_LENGTH,
        description="Called (signed POST) when the job is SUCCESS or FAILURE.",
    )


class CaptionProduced(_Event):
    """Public result: the job's caption. `event_id` is stable across redeliveries."""

    type: Literal["caption.produced"] = "caption.produced"
    event_id: str
    job_id: str
    image_ref: str
    sha256: str
    caption: str
    model: str
    submitted_at: datetime
    produced_at: datetime


class CaptionFailed(_Event):
    """Public result: the job ended without a caption, and why."""

    type: Literal["caption.failed"] = "caption.failed"
    event_id: str
    job_id: str
    image_ref: str
    error: str
    submitted_at: datetime
    failed_at: datetime


class JobCancelRequested(_Event):
    """A client asked to cancel a job that had not started."""

    type: Literal["job.cancel_requested"] = "job.cancel_requested"
    job_id: str
    requested_at: datetime


class JobExpiryDue(_Event):
    """A finished job outlived the TTL: forget its state and, if unused, its image."""

    type: Literal["job.expiry_due"] = "job.expiry_due"
    job_id: str
    image_ref: str | None = None
    due_at: datetime


JobControl = Annotated[JobCancelRequested | JobExpiryDue, Field(discriminator="type")]


CaptionEvent = Annotated[CaptionProduced | CaptionFailed, Field(discriminator="type")]


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCESS, JobStatus.FAILURE)


class JobState(_Event):
    """The latest state of one job (the value on the compacted job-state topic)."""

    type: Literal["job.state"] = "job.state"
    job_id: str
    status: JobStatus
    attempts: int = Field(default=0, ge=0, description="Processing attempts started so far.")
    submitted_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    caption: str | None = None
    error: str | None = None
    idempotency_key: str | None = Field(default=None, max_length=200)
    request_digest: str | None = None
    cache_key: str | None = Field(
        default=None, description="Digest of image content and options (caption cache)."
    )
    model: str | None = Field(default=None, description="The model that made the caption.")
    image_ref: str | None = Field(default=None, description="Where the image is stored.")
    cached_from: str | None = Field(
        default=None, description="The job whose caption was reused, on a cache hit."
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=WEBHOOK_URL_MAX_LENGTH,
        description="Called (signed POST) when the job is SUCCESS or FAILURE.",
    )

    def supersedes(self, old: JobState | None) -> bool:
        """Whether this state wins over `old`, the state held so far for the same job id:
        the one rule of the gateway's view, webhooks and bulk ingest.

        The log order of one job's partition is authoritative, except that the first
        terminal state is final (a redelivered job can never replace its result or reopen
        it), and PENDING never replaces anything (a gateway writes it before the image
        event, so a PENDING after another state is a second replica's copy for the same
        idempotency key). On a compacted topic only each job's last record is left; with
        PENDING written first that is the job's latest state (for a job a redelivery
        finished twice, its second result rather than its first). A state submitted after
        `old` finished belongs to a new job with the same id (an `Idempotency-Key` reused
        after its job expired) and replaces it; a late state of the older job never does.
        """
        if old is None:
            return True
        if old.finished_at is not None and self.submitted_at > old.finished_at:
            return True  # a new job under the id
        if self.finished_at is not None and self.finished_at < old.submitted_at:
            return False  # a late state of an older job under the id
        return not old.status.terminal and self.status is not JobStatus.PENDING

    def advance(self, status: JobStatus, **changes: object) -> JobState:
        now = utcnow()
        update: dict[str, object] = {"status": status, "updated_at": now, **changes}
        if status is JobStatus.STARTED:
            update.setdefault("started_at", now)
            update["attempts"] = self.attempts + 1
        if status.terminal:
            update.setdefault("finished_at", now)
        return self.model_copy(update=update)

    @classmethod
    def pending(cls, job_id: str, submitted_at: datetime) -> JobState:
        return cls(
            job_id=job_id,
            status=JobStatus.PENDING,
            submitted_at=submitted_at,
            updated_at=submitted_at,
        )

    @classmethod
    def submitted(cls, event: ImageSubmitted) -> JobState:
        """The PENDING state of the job `event` creates. Every later state keeps the
        idempotency key, so it survives compaction of the job-state topic."""
        return cls.pending(event.job_id, event.submitted_at).model_copy(
            update={
                "idempotency_key": event.idempotency_key,
                "request_digest": event.request_digest,
                "cache_key": caption_cache_key(event.sha256, event.options),
                "image_ref": event.image_ref,
                "webhook_url": event.webhook_url,
            }
        )


_M = TypeVar("_M", bound=BaseModel)

_caption_adapter: TypeAdapter[CaptionProduced | CaptionFailed] = TypeAdapter(CaptionEvent)


def _decode(model: type[_M], raw: bytes | str | None) -> _M:
    if raw is None:
        raise EventDecodeError(f"empty message where a {model.__name__} was expected")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise EventDecodeError(f"not a valid {model.__name__} v{SCHEMA_VERSION}: {exc}") from exc


def decode_image_submitted(raw: bytes | str | None) -> ImageSubmitted:
    return _decode(ImageSubmitted, raw)


def decode_job_state(raw: bytes | str | None) -> JobState:
    return _decode(JobState, raw)


def decode_caption_event(raw: bytes | str) -> CaptionProduced | CaptionFailed:
    try:
        return _caption_adapter.validate_json(raw)
    except ValidationError as exc:
        raise EventDecodeError(f"not a valid caption event v{SCHEMA_VERSION}: {exc}") from exc


_control_adapter: TypeAdapter[JobCancelRequested | JobExpiryDue] = TypeAdapter(JobControl)


def decode_job_control(raw: bytes | str | None) -> JobCancelRequested | JobExpiryDue:
    if raw is None:
        raise EventDecodeError("empty message where a job-control request was expected")
    try:
        return _control_adapter.validate_json(raw)
    except ValidationError as exc:
        raise EventDecodeError(f"not a valid job-control request v{SCHEMA_VERSION}: {exc}") from exc
