"""HTTP API contracts of the gateway (request and response bodies)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from captionstream.schemas.events import (
    WEBHOOK_URL_MAX_LENGTH,
    GenerationOptions,
    JobState,
    JobStatus,
)

WEBHOOK_URL_DESCRIPTION = (
    "Optional: an http(s) URL that gets a signed POST (`X-Captionstream-Signature`) when "
    "the job is SUCCESS or FAILURE. Same address rules as image URLs (public addresses "
    "only unless allow-listed); refused with 400 when the server has no webhook secret."
)
WEBHOOK_URL_EXAMPLE = "https://hooks.example.com/captionstream"


class ErrorResponse(BaseModel):
    """Every error answer: `{"detail": "..."}` (422 has a list, see
    `ValidationErrorResponse`)."""

    detail: str = Field(examples=["unsupported image type: image/svg+xml"])


class ValidationErrorItem(BaseModel):
    loc: list[str | int] = Field(examples=[["body", "options", "num_beams"]])
    msg: str = Field(examples=["Input should be less than or equal to 8"])
    type: str = Field(examples=["less_than_equal"])


class ValidationErrorResponse(BaseModel):
    """422: the request is well-formed but a field is missing or out of range."""

    detail: list[ValidationErrorItem]


class JobRequest(BaseModel):
    """`POST /api/v1/jobs`: caption the image at a URL, which the gateway fetches."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image_url": "https://example.com/cat.jpg"},
                {
                    "image_url": "https://example.com/cat.jpg",
                    "options": {"max_new_tokens": 40, "num_beams": 3, "prompt": "a photo of"},
                    "webhook_url": WEBHOOK_URL_EXAMPLE,
                },
            ]
        },
    )

    image_url: str = Field(
        min_length=1,
        max_length=2048,
        description="http or https URL of the image; it must resolve to a public address.",
        examples=["https://example.com/cat.jpg"],
    )
    options: GenerationOptions = GenerationOptions()
    webhook_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=WEBHOOK_URL_MAX_LENGTH,
        description=WEBHOOK_URL_DESCRIPTION,
        examples=[WEBHOOK_URL_EXAMPLE],
    )


class UploadOptions(GenerationOptions):
    """The multipart form fields next to `file`: `GenerationOptions` and `webhook_url`
    (other fields are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    webhook_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=WEBHOOK_URL_MAX_LENGTH,
        description=WEBHOOK_URL_DESCRIPTION,
        examples=[WEBHOOK_URL_EXAMPLE],
    )

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # An empty form field (what a browser sends for an empty input) means "none".
        return None if value == "" else value

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions.model_validate(self.model_dump(exclude={"webhook_url"}))


class JobAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "5b7a5c0e3c4f4a55a9b8c0d1e2f3a4b5",
                    "status": "PENDING",
                    "submitted_at": "2025-01-01T12:00:00Z",
                    "cache_hit": False,
                }
            ]
        }
    )

    job_id: str = Field(examples=["5b7a5c0e3c4f4a55a9b8c0d1e2f3a4b5"])
    status: JobStatus = Field(examples=[JobStatus.PENDING])
    submitted_at: datetime
    cache_hit: bool = Field(
        default=False,
        description="Answered from the caption cache: the job is already SUCCESS.",
    )


class JobResult(BaseModel):
    caption: str = Field(examples=["a cat sitting on a window sill"])


class JobStatusResponse(BaseModel):
    model_config = ConfigDict(
        use_enum_values=False,
        json_schema_extra={
            "examples": [
                {
                    "job_id": "5b7a5c0e3c4f4a55a9b8c0d1e2f3a4b5",
                    "status": "SUCCESS",
                    "submitted_at": "2025-01-01T12:00:00Z",
                    "updated_at": "2025-01-01T12:00:02Z",
                    "attempts": 1,
                    "result": {"caption": "a cat sitting on a window sill"},
                    "error": None,
                    "cache_hit": False,
                }
            ]
        },
    )

    job_id: str
    status: JobStatus
    submitted_at: datetime
    updated_at: datetime
    attempts: int
    result: JobResult | None = None
    error: str | None = None
    cache_hit: bool = False

    @classmethod
    def from_state(cls, state: JobState) -> JobStatusResponse:
        return cls(
            job_id=state.job_id,
            status=state.status,
            submitted_at=state.submitted_at,
            updated_at=state.updated_at,
            attempts=state.attempts,
            result=JobResult(caption=state.caption) if state.caption is not None else None,
            error=state.error,
            cache_hit=state.cached_from is not None,
        )


class ReadinessResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "checks": {"broker": "ok (1 broker(s))", "job_view": "ok (42 jobs)"},
                }
            ]
        }
    )

    status: Literal["ready"] = "ready"
    checks: dict[str, str] = Field(
        examples=[{"broker": "ok (1 broker(s))", "job_view": "ok (42 jobs)"}]
    )


class NotReadyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": "not ready: broker: Kafka unreachable",
                    "checks": {"broker": "Kafka unreachable", "job_view": "ok (42 jobs)"},
                }
            ]
        }
    )

    detail: str = Field(examples=["not ready: broker: Kafka unreachable"])
    checks: dict[str, str]
