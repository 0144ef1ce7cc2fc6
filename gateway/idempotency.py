"""`Idempotency-Key`: a retried submission returns the job the first request created.

The key's record is the job itself (its `idempotency_key` and `request_digest`, kept in
the job view), so every replica that sees the job answers a retry the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Header

from captionstream.errors import IdempotencyConflict
from captionstream.gateway.view import JobView
from captionstream.schemas.events import GenerationOptions, JobState

IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="Retrying with the same key returns the job the first request created.",
        examples=["order-17-caption"],
    ),
]


def request_digest(
    kind: str, body: bytes, options: GenerationOptions, webhook_url: str | None = None
) -> str:
    """What an idempotent retry must repeat: the same kind of submission, the same image
    bytes (or URL), the same options and the same webhook URL (a retry that asks for
    another receiver is a different request). Without a webhook the digest is what it
    was before webhooks existed, so keys recorded then still match."""
    digest = hashlib.sha256(kind.encode() + b"\0" + body + b"\0")
    digest.update(options.model_dump_json().encode())
    if webhook_url is not None:
        digest.update(b"\0webhook\0" + webhook_url.encode())
    return digest.hexdigest()


@contextlib.asynccontextmanager
async def earlier_job(
    view: JobView, key: str | None, digest: str
) -> AsyncIterator[JobState | None]:
    """Yield the job an earlier request with `key` created (a replay), or None: then the
    caller creates the job while holding the key's lock, so two concurrent retries make
    one job. The same key with another `digest` is a 409."""
    if key is None:
        yield None
        return
    async with view.idempotency_lock(key):
        earlier = view.find_by_idempotency_key(key)
        if earlier is not None and earlier.request_digest != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used for a different request"
            )
        yield earlier
