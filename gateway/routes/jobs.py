"""Jobs: submit an image (upload or URL), read a job's status, and follow jobs over a
WebSocket (one job or many) or Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Annotated, Any

from aiokafka.errors import KafkaError
from fastapi import (
    APIRouter,
    Body,
    File,
    Form,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
    WebSocket,
    status,
)
from fastapi.responses import StreamingResponse
from starlette.websockets import WebSocketDisconnect

from captionstream.errors import BrokerError, IdempotencyConflict, ImageTooLarge
from captionstream.logging_config import job_context
from gateway.deps import (
    FetcherDep,
    PublisherDep,
    Submission,
    SubmissionDep,
    SubmissionRateLimit,
    ViewDep,
    WsMetricsDep,
    WsViewDep,
)
from gateway.openapi import error_responses
from gateway.view import JobView
from ingest.submission import submit_image
from schemas.api import JobAccepted, JobRequest, JobStatusResponse, UploadOptions
from schemas.events import GenerationOptions, JobState, JobStatus

# The prefix lives on the router (not on `include_router`) so that each route's `path` is
# its full template, which the metrics middleware uses as the `route` label.
router = APIRouter(prefix="/api/v1", tags=["jobs"])
log = logging.getLogger(__name__)

# What each route can answer besides its success (401 is added for every /api/v1 route
# when API keys are on; see gateway.security.api_router_options).
UPLOAD_ERRORS = (400, 409, 413, 415, 422, 429, 503)
URL_ERRORS = (400, 409, 413, 415, 422, 429, 502, 503, 504)
STATUS_ERRORS = (404, 422)
CANCEL_ERRORS = (404, 409, 422, 503)
EVENTS_ERRORS = (404, 422)

LOCATION_HEADER = {
    "Location": {"description": "The job's status URL.", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when an Idempotency-Key retry returned the earlier job.",
        "schema": {"type": "string"},
    },
}
ACCEPTED = {"description": "The job was accepted.", "headers": LOCATION_HEADER}

URL_EXAMPLES = {
    "plain": {
        "summary": "Just an image URL",
        "value": {"image_url": "https://example.com/cat.jpg"},
    },
    "options and webhook": {
        "summary": "Generation options and a webhook",
        "value": {
            "image_url": "https://example.com/cat.jpg",
            "options": {"max_new_tokens": 40, "num_beams": 3, "prompt": "a photo of"},
            "webhook_url": "https://hooks.example.com/captionstream",
        },
    },
}


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
async def _idempotent(
    view: JobView, key: str | None, digest: str, response: Response
) -> AsyncIterator[JobAccepted | None]:
    """Yield the job an earlier request with `key` created (a replay), or None: then
    the caller creates the job while holding the key's lock."""
    if key is None:
        yield None
        return
    async with view.idempotency_lock(key):
        earlier = view.find_by_idempotency_key(key)
        if earlier is None:
            yield None
            return
        if earlier.request_digest != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used for a different request"
            )
        response.headers["Idempotent-Replayed"] = "true"
        response.headers["Location"] = f"{router.prefix}/status/{earlier.job_id}"
        yield JobAccepted(
            job_id=earlier.job_id, status=earlier.status, submitted_at=earlier.submitted_at
        )


async def _accept(
    ctx: Submission,
    data: bytes,
    filename: str | None,
    options: GenerationOptions,
    source: str,
    *,
    idempotency: tuple[str | None, str] = (None, ""),
    webhook_url: str | None,
    response: Response,
) -> JobAccepted:
    """validate -> store -> publish (or answer from the caption cache), the same for
    every way an image arrives."""
    try:
        key, digest = idempotency
        state, _ = await submit_image(
            data,
            filename,
            limits=ctx.limits,
            blobs=ctx.blobs,
            publisher=ctx.publisher,
            options=options,
            idempotency_key=key,
            request_digest=digest if key else None,
            cache=ctx.cache,
            webhook_url=webhook_url,
        )
    except KafkaError as exc:
        raise BrokerError(f"job not accepted, Kafka is unavailable: {exc}") from exc
    ctx.view.apply(state)  # visible on this replica at once; others see it from the topic
    log.info("job %s accepted (%s)", state.job_id, source, extra=job_context(state.job_id))
    ctx.metrics.jobs_submitted.labels(source).inc()
    response.headers["Location"] = f"{router.prefix}/status/{state.job_id}"
    return JobAccepted(
        job_id=state.job_id,
        status=state.status,
        submitted_at=state.submitted_at,
        cache_hit=state.cached_from is not None,
    )


@router.post(
    "/upload",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[SubmissionRateLimit],
    response_model=JobAccepted,
    responses={202: ACCEPTED, **error_responses(*UPLOAD_ERRORS)},
    summary="Submit an image (multipart field `file`) for captioning",
)
async def upload(
    file: Annotated[UploadFile, File(description="The image (JPEG, PNG, GIF, WebP, ...).")],
    options: Annotated[UploadOptions, Form()],
    response: Response,
    ctx: SubmissionDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    """Optional form fields `max_new_tokens`, `num_beams`, `prompt` set the job's
    generation options (as in `POST /api/v1/jobs`), and `webhook_url` asks for a signed
    POST when the job finishes. With an `Idempotency-Key` header, a retry returns the
    job the first request created (header `Idempotent-Replayed`), and the same key with
    a different request is a 409."""
    # Read one byte past the limit: enough to know it is too large, never the whole body.
    data = await file.read(ctx.limits.max_bytes + 1)
    if len(data) > ctx.limits.max_bytes:
        raise ImageTooLarge(f"image exceeds the limit of {ctx.limits.max_bytes} bytes")
    generation = options.generation_options()
    digest = request_digest("upload", data, generation, options.webhook_url)
    async with _idempotent(ctx.view, idempotency_key, digest, response) as replay:
        if replay is not None:
            return replay
        webhook_url = await ctx.webhooks.check_submission(options.webhook_url)
        return await _accept(
            ctx,
            data,
            file.filename,
            generation,
            "upload",
            idempotency=(idempotency_key, digest),
            webhook_url=webhook_url,
            response=response,
        )


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[SubmissionRateLimit],
    response_model=JobAccepted,
    responses={202: ACCEPTED, **error_responses(*URL_ERRORS)},
    summary="Submit an image by URL (fetched by the gateway) for captioning",
)
async def submit_by_url(
    body: Annotated[JobRequest, Body(openapi_examples=URL_EXAMPLES)],
    response: Response,
    fetcher: FetcherDep,
    ctx: SubmissionDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    """The gateway fetches `image_url` (http/https, public addresses only, at most 3
    redirects, the upload size limit) and accepts it like an upload: 400 for a URL it
    will not fetch (or a `webhook_url` it will not call), 413/415 for the content,
    502/504 when the upstream fails. `Idempotency-Key` works as for uploads (a replay
    does not fetch again)."""
    digest = request_digest("url", body.image_url.encode(), body.options, body.webhook_url)
    async with _idempotent(ctx.view, idempotency_key, digest, response) as replay:
        if replay is not None:
            return replay
        # The webhook first: refusing it costs no fetch.
        webhook_url = await ctx.webhooks.check_submission(body.webhook_url)
        data = await fetcher.fetch(body.image_url)
        return await _accept(
            ctx,
            data,
            None,  # a URL path is no file name: the content alone decides
            body.options,
            "url",
            idempotency=(idempotency_key, digest),
            webhook_url=webhook_url,
            response=response,
        )


def _known(view: ViewDep, job_id: str) -> JobState:
    state = view.get(job_id)
    if state is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id!r} not found")
    return state


# `?wait=` is bounded so that a held request stays well inside the read timeouts of
# clients and proxies (often 60 s or more); a client wanting longer asks again.
STATUS_WAIT_MAX_S = 60
# Polling clients are told to ask again after this long: a model run takes about a
# second, and Retry-After has whole seconds, so 1 s means no finished job is noticed late
# by more than a second. Clients that want no delay at all use `?wait=` or a push channel.
STATUS_RETRY_AFTER_S = 1

STATUS_OK = {
    "description": "The job's current status (after `wait`, the status it reached).",
    "headers": {
        "Retry-After": {
            "description": "Only while the job is unfinished (PENDING, STARTED, RETRY): "
            "seconds to wait before asking again.",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


@router.get(
    "/status/{job_id}",
    response_model=JobStatusResponse,
    responses={200: STATUS_OK, **error_responses(*STATUS_ERRORS)},
    summary="The current status of a job (optionally waiting until it finishes)",
)
async def job_status(
    job_id: str,
    view: ViewDep,
    request: Request,
    response: Response,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=STATUS_WAIT_MAX_S,
            description="Seconds to hold the request until the job is SUCCESS or FAILURE "
            f"(0 to {STATUS_WAIT_MAX_S}; fractions allowed); the answer then comes as soon "
            "as the job finishes, or after `wait` seconds with its unfinished status. "
            "A job that expires meanwhile is a 404 when the wait ends.",
            examples=[30],
        ),
    ] = 0,
) -> JobStatusResponse:
    """The job's status. An unfinished job's answer carries `Retry-After` (seconds) for
    clients that poll; with `?wait=N` one request replaces the polling: it is answered
    when the job finishes, or after N seconds (200 either way, the same body)."""
    state = _known(view, job_id)
    if wait > 0 and not state.status.terminal:
        await _until_finished(view, job_id, wait, request)
        state = _known(view, job_id)  # expired during the wait: 404, as without it
    if not state.status.terminal:
        response.headers["Retry-After"] = str(STATUS_RETRY_AFTER_S)
    return JobStatusResponse.from_state(state)


async def _until_finished(view: JobView, job_id: str, timeout_s: float, request: Request) -> None:
    """Return when the view shows the job terminal, after `timeout_s`, or as soon as the
    client disconnects. The view pushes each change to its subscribers (no polling); the
    subscription ends with this call, whichever way it returns."""

    async def finished() -> None:
        async for _ in view.follow(job_id):  # ends after the terminal state
            pass

    follow = asyncio.create_task(finished(), name=f"status-wait-{job_id}")
    gone = asyncio.create_task(_http_client_gone(request), name=f"status-wait-gone-{job_id}")
    try:
        await asyncio.wait({follow, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (follow, gone):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _http_client_gone(request: Request) -> None:
    """Return when the client of this (bodiless) request disconnects: the server's
    `receive` then answers `http.disconnect`; until then it waits."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.delete(
    "/jobs/{job_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobStatusResponse,
    responses=error_responses(*CANCEL_ERRORS),
    summary="Cancel a job that has not started",
)
async def cancel_job(job_id: str, view: ViewDep, publisher: PublisherDep) -> JobStatusResponse:
    """202 with the job's current status when the cancellation was requested: unless a
    worker picks the job up first, it then ends FAILURE ("cancelled ..."). 409 when the
    job has already started or finished."""
    state = _known(view, job_id)
    if state.status is not JobStatus.PENDING:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job_id!r} is {state.status.value}: only a PENDING job can be cancelled",
        )
    try:
        await publisher.publish_cancel_request(job_id)
    except KafkaError as exc:
        raise BrokerError(f"cancellation not recorded, Kafka is unavailable: {exc}") from exc
    return JobStatusResponse.from_state(state)


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventStreamResponse,
    responses={
        200: {
            "description": "Server-Sent Events: one `status` event per state.",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": "event: status\nid: 2025-01-01T12:00:02+00:00\n"
                    'data: {"job_id": "5b7a5c0e3c4f4a55a9b8c0d1e2f3a4b5", "status": "SUCCESS", '
                    '"result": {"caption": "a cat"}}\n\n',
                }
            },
        },
        **error_responses(*EVENTS_ERRORS, json_route=False),
    },
    summary="Follow a job with Server-Sent Events (for clients without WebSockets)",
)
async def job_events(job_id: str, view: ViewDep) -> EventStreamResponse:
    """One `status` event with the current state, one per change, then the stream ends
    after the terminal state."""
    _known(view, job_id)

    async def stream() -> AsyncIterator[str]:
        async for state in view.follow(job_id):
            body = JobStatusResponse.from_state(state).model_dump_json()
            yield f"event: status\nid: {state.updated_at.isoformat()}\ndata: {body}\n\n"

    return EventStreamResponse(
        stream(),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.websocket("/ws/{job_id}")
async def follow_job(
    websocket: WebSocket, job_id: str, view: WsViewDep, metrics: WsMetricsDep
) -> None:
    """Send the job's current state, then every change; close after the terminal one."""
    with metrics.websockets_open.track_inprogress():
        await websocket.accept()
        if view.get(job_id) is None:
            await websocket.send_json({"detail": f"job {job_id!r} not found"})
            await websocket.close(code=4404)
            return
        await _until_client_gone(websocket, _forward(websocket, view.follow(job_id)))
        await _close_quietly(websocket)


@router.websocket("/ws")
async def follow_jobs(websocket: WebSocket, view: WsViewDep, metrics: WsMetricsDep) -> None:
    """One socket for many jobs: send `{"follow": [job ids]}` (any number of times);
    every state of every followed job arrives as a status message naming its job_id. An
    unknown id gets `{"job_id": ..., "detail": "job ... not found"}`. The socket stays
    open until the client closes it."""
    with metrics.websockets_open.track_inprogress():
        await websocket.accept()
        followers: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                for job_id in _follow_request(message.get("text")):
                    if job_id in followers:
                        continue
                    if view.get(job_id) is None:
                        await websocket.send_json(
                            {"job_id": job_id, "detail": f"job {job_id!r} not found"}
                        )
                        continue
                    followers[job_id] = asyncio.create_task(
                        _forward(websocket, view.follow(job_id)), name=f"ws-follow-{job_id}"
                    )
        except WebSocketDisconnect:
            return
        finally:
            for task in followers.values():
                task.cancel()


def _follow_request(text: str | None) -> list[str]:
    try:
        body = json.loads(text or "")
    except ValueError:
        return []
    ids = body.get("follow") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        return []
    return [i for i in ids if isinstance(i, str) and 0 < len(i) <= 200]


async def _forward(websocket: WebSocket, states: AsyncIterator[JobState]) -> None:
    async for state in states:
        await websocket.send_text(JobStatusResponse.from_state(state).model_dump_json())


async def _until_client_gone(websocket: WebSocket, work: Coroutine[Any, Any, None]) -> None:
    """Run `work`, but stop it as soon as the client disconnects.

    Waiting only for job changes would never notice a client that left while its job
    stays pending: the handler (and its subscription) would live on forever.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(_client_gone(websocket))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await pending


async def _close_quietly(websocket: WebSocket) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close()


async def _client_gone(websocket: WebSocket) -> None:
    """Return when the client disconnects (messages from it are ignored)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
