"""HTTP API contracts of the gateway (request and response bodies)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import GenerationOptions, JobState, JobStatus


class ErrorResponse(BaseModel):
    detail: str = Field(examples=["unsupported image type: image/svg+xml"])


class JobRequest(BaseModel):
    """`POST /api/v1/jobs`: caption the image at a URL, which the gateway fetches."""

    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(
        min_length=1,
        max_length=2048,
        description="http or https URL of the image; it must resolve to a public address.",
        examples=["https://example.com/cat.jpg"],
    )
    options: GenerationOptions = GenerationOptions()


class UploadOptions(GenerationOptions):
    """`GenerationOptions` as multipart form fields next to `file` (other fields are not
    options and are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions.model_validate(self.model_dump())


class JobAccepted(BaseModel):
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
    model_config = ConfigDict(use_enum_values=False)

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
    status: Literal["ready"] = "ready"
    checks: dict[str, str] = Field(
        examples=[{"broker": "ok (1 broker(s))", "job_view": "ok (42 jobs)"}]
    )


class NotReadyResponse(BaseModel):
    detail: str = Field(examples=["not ready: broker: Kafka unreachable"])
    checks: dict[str, str]
