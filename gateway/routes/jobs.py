"""Jobs: submit an image (upload or URL), read a job's status, cancel it, and follow jobs
over Server-Sent Events or a WebSocket (one job or many).

The handlers parse and answer; `gateway.job_actions` does the work, `gateway.push` the
push channels, `gateway.jobs_openapi` documents them.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Body, File, Form, Request, Response, UploadFile, WebSocket, status

from captionstream.errors import ImageTooLarge
from captionstream.gateway.deps import GatewayDep, JobViewDep, KafkaDep, SubmissionRateLimit
from captionstream.gateway.idempotency import IdempotencyKey, request_digest
from captionstream.gateway.job_actions import known_job, request_cancellation, submit_job
from captionstream.gateway.jobs_openapi import (
    CANCEL_RESPONSES,
    EVENTS_RESPONSES,
    STATUS_RESPONSES,
    UPLOAD_RESPONSES,
    URL_EXAMPLES,
    URL_RESPONSES,
)
from captionstream.gateway.push import (
    STATUS_RETRY_AFTER_S,
    EventStreamResponse,
    StatusWait,
    follow_many,
    follow_one,
    status_events,
    until_finished,
)
from captionstream.gateway.routes import API_PREFIX
from captionstream.schemas.api import JobAccepted, JobRequest, JobStatusResponse, UploadOptions

router = APIRouter(prefix=API_PREFIX, tags=["jobs"])


@router.post(
    "/upload",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[SubmissionRateLimit],
    response_model=JobAccepted,
    responses=UPLOAD_RESPONSES,
    summary="Submit an image (multipart field `file`) for captioning",
)
async def upload(
    file: Annotated[UploadFile, File(description="The image (JPEG, PNG, GIF, WebP, ...).")],
    options: Annotated[UploadOptions, Form()],
    response: Response,
    gateway: GatewayDep,
    kafka: KafkaDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    """Optional form fields `max_new_tokens`, `num_beams`, `prompt` set the job's
    generation options (as in `POST /api/v1/jobs`), and `webhook_url` asks for a signed
    POST when the job finishes. With an `Idempotency-Key` header, a retry returns the
    job the first request created (header `Idempotent-Replayed`), and the same key with
    a different request is a 409."""
    # Read one byte past the limit: enough to know it is too large, never the whole body.
    max_bytes = gateway.limits.max_bytes
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image exceeds the limit of {max_bytes} bytes")
    generation = options.generation_options()
    accepted = await submit_job(
        gateway,
        kafka,
        data,
        source="upload",
        filename=file.filename,
        options=generation,
        webhook_url=options.webhook_url,
        idempotency_key=idempotency_key,
        digest=request_digest("upload", data, generation, options.webhook_url),
    )
    response.headers.update(accepted.headers)
    return accepted.job


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[SubmissionRateLimit],
    response_model=JobAccepted,
    responses=URL_RESPONSES,
    summary="Submit an image by URL (fetched by the gateway) for captioning",
)
async def submit_by_url(
    body: Annotated[JobRequest, Body(openapi_examples=URL_EXAMPLES)],
    response: Response,
    gateway: GatewayDep,
    kafka: KafkaDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    """The gateway fetches `image_url` (http/https, public addresses only, at most 3
    redirects, the upload size limit) and accepts it like an upload: 400 for a URL it
    will not fetch (or a `webhook_url` it will not call), 413/415 for the content,
    502/504 when the upstream fails. `Idempotency-Key` works as for uploads (a replay
    does not fetch again)."""
    accepted = await submit_job(
        gateway,
        kafka,
        partial(gateway.fetcher.fetch, body.image_url),
        source="url",
        filename=None,  # a URL path is no file name: the content alone decides
        options=body.options,
        webhook_url=body.webhook_url,
        idempotency_key=idempotency_key,
        digest=request_digest("url", body.image_url.encode(), body.options, body.webhook_url),
    )
    response.headers.update(accepted.headers)
    return accepted.job


@router.get(
    "/status/{job_id}",
    response_model=JobStatusResponse,
    responses=STATUS_RESPONSES,
    summary="The current status of a job (optionally waiting until it finishes)",
)
async def job_status(
    job_id: str, view: JobViewDep, request: Request, response: Response, wait: StatusWait = 0
) -> JobStatusResponse:
    """The job's status. An unfinished job's answer carries `Retry-After` (seconds) for
    clients that poll; with `?wait=N` one request replaces the polling: it is answered
    when the job finishes, or after N seconds (200 either way, the same body)."""
    state = known_job(view, job_id)
    if wait > 0 and not state.status.terminal:
        await until_finished(view, job_id, wait, request)
        state = known_job(view, job_id)  # expired during the wait: 404, as without it
    if not state.status.terminal:
        response.headers["Retry-After"] = str(STATUS_RETRY_AFTER_S)
    return JobStatusResponse.from_state(state)


@router.delete(
    "/jobs/{job_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobStatusResponse,
    responses=CANCEL_RESPONSES,
    summary="Cancel a job that has not started",
)
async def cancel_job(job_id: str, view: JobViewDep, kafka: KafkaDep) -> JobStatusResponse:
    """202 with the job's current status when the cancellation was requested: unless a
    worker picks the job up first, it then ends FAILURE ("cancelled ..."). 409 when the
    job has already started or finished."""
    return JobStatusResponse.from_state(await request_cancellation(view, kafka, job_id))


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventStreamResponse,
    responses=EVENTS_RESPONSES,
    summary="Follow a job with Server-Sent Events (for clients without WebSockets)",
)
async def job_events(job_id: str, view: JobViewDep) -> EventStreamResponse:
    """One `status` event with the current state, one per change, then the stream ends
    after the terminal state."""
    known_job(view, job_id)
    return status_events(view, job_id)


@router.websocket("/ws/{job_id}")
async def follow_job(
    websocket: WebSocket, job_id: str, view: JobViewDep, gateway: GatewayDep
) -> None:
    """Send the job's current state, then every change; close after the terminal one."""
    with gateway.metrics.websockets_open.track_inprogress():
        await follow_one(websocket, view, job_id)


@router.websocket("/ws")
async def follow_jobs(websocket: WebSocket, view: JobViewDep, gateway: GatewayDep) -> None:
    """One socket for many jobs: send `{"follow": [job ids]}` (any number of times);
    every state of every followed job arrives as a status message naming its job_id. An
    unknown id gets `{"job_id": ..., "detail": "job ... not found"}`. The socket stays
    open until the client closes it."""
    with gateway.metrics.websockets_open.track_inprogress():
        await follow_many(websocket, view)
