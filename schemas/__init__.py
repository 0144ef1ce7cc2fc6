"""Versioned contracts of captionstream: events on Kafka topics and the HTTP API.

Pure data: this package imports pydantic only (no Kafka, FastAPI or torch), so any
downstream consumer can depend on it, and `schemas/jsonschema/` holds the JSON Schema of
each public event for consumers in other languages.
"""

from captionstream.schemas.api import ErrorResponse, JobAccepted, JobResult, JobStatusResponse
from captionstream.schemas.events import (
    SCHEMA_VERSION,
    CaptionEvent,
    CaptionFailed,
    CaptionProduced,
    EventDecodeError,
    GenerationOptions,
    ImageSubmitted,
    JobState,
    JobStatus,
    decode_caption_event,
    decode_image_submitted,
    decode_job_state,
)
from captionstream.schemas.topics import TOPICS, Topics, TopicSpec

__all__ = [
    "SCHEMA_VERSION",
    "TOPICS",
    "CaptionEvent",
    "CaptionFailed",
    "CaptionProduced",
    "ErrorResponse",
    "EventDecodeError",
    "GenerationOptions",
    "ImageSubmitted",
    "JobAccepted",
    "JobResult",
    "JobState",
    "JobStatus",
    "JobStatusResponse",
    "TopicSpec",
    "Topics",
    "decode_caption_event",
    "decode_image_submitted",
    "decode_job_state",
]
