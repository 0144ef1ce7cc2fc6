"""The webhook contract: the body POSTed to a job's `webhook_url`, and its signature.

Standard library and pydantic only, like the rest of `schemas/`, so a receiver written in
Python can import `verify_signature` (or copy it: it is self-contained).

Signature header (Stripe style):

    X-Captionstream-Signature: t=1718000000,v1=5257a869e7ec...8d8bd  (64 hex digits)

`v1` is the hex HMAC-SHA256, keyed with `CAPTIONSTREAM_WEBHOOK_SECRET`, of
`f"{t}.".encode() + body` (the raw request body, byte for byte). `t` is the Unix time of
the attempt, so a receiver refuses replays of old requests by checking it is recent.
There may be several `v1=` entries (e.g. while a secret is rotated): one match suffices.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from captionstream.schemas.events import SCHEMA_VERSION, JobState, JobStatus, caption_event_id

SIGNATURE_HEADER = "X-Captionstream-Signature"
EVENT_ID_HEADER = "X-Captionstream-Event-Id"
DEFAULT_TOLERANCE_S = 300


class JobFinishedWebhook(BaseModel):
    """POSTed as JSON to the job's `webhook_url` once the job is SUCCESS or FAILURE.

    The body is the same on every attempt; `event_id` is stable (it equals the
    `event_id` of the job's caption event on `captionstream.captions.v1`), so a receiver
    that may see a webhook twice (retries, at-least-once delivery) drops duplicates by it.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "type": "job.finished",
                    "schema_version": 1,
                    "event_id": "0b8f3f0e-8d2f-5a53-9c1e-3f8b7d0c2a11",
                    "job_id": "5b7a5c0e3c4f4a55a9b8c0d1e2f3a4b5",
                    "status": "SUCCESS",
                    "caption": "a cat sitting on a window sill",
                    "error": None,
                    "model": "Salesforce/blip-image-captioning-base",
                    "attempts": 1,
                    "cache_hit": False,
                    "submitted_at": "2025-01-01T12:00:00Z",
                    "finished_at": "2025-01-01T12:00:02Z",
                }
            ]
        },
    )

    type: Literal["job.finished"] = "job.finished"
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    job_id: str
    status: JobStatus = Field(description="SUCCESS or FAILURE.")
    caption: str | None = None
    error: str | None = Field(default=None, description="Why the job failed (FAILURE).")
    model: str | None = None
    attempts: int = Field(ge=0)
    cache_hit: bool = False
    submitted_at: datetime
    finished_at: datetime

    @classmethod
    def from_state(cls, state: JobState) -> JobFinishedWebhook:
        if not state.status.terminal:
            raise ValueError(f"job {state.job_id} is {state.status.value}, not finished")
        return cls(
            event_id=caption_event_id(state.job_id, state.submitted_at),
            job_id=state.job_id,
            status=state.status,
            caption=state.caption,
            error=state.error,
            model=state.model,
            attempts=state.attempts,
            cache_hit=state.cached_from is not None,
            submitted_at=state.submitted_at,
            finished_at=state.finished_at or state.updated_at,
        )


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The `X-Captionstream-Signature` header value for `body`, at `timestamp` (now)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether `header` (the `X-Captionstream-Signature` value) signs `body` with
    `secret` and its timestamp is within `tolerance_s` of `now` (default: the clock).

    Pass the raw body as received: parsing and re-serializing JSON changes the bytes.
    """
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, body)
    # Every candidate is compared (no early exit) in constant time.
    matches = [hmac.compare_digest(expected, candidate) for candidate in candidates]
    return any(matches)
