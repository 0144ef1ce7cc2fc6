"""Jobs: submit an image, read a job's status, follow it over a WebSocket."""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka.errors import KafkaError
from fastapi import APIRouter, HTTPException, Response, UploadFile, WebSocket, status
from starlette.websockets import WebSocketDisconnect

from captionstream.errors import BrokerError, ImageTooLarge
from gateway.deps import (
    BlobsDep,
    LimitsDep,
    MetricsDep,
    PublisherDep,
    ViewDep,
    WsMetricsDep,
    WsViewDep,
)
from gateway.view import JobView
from ingest.submission import submit_image
from schemas.api import ErrorResponse, JobAccepted, JobStatusResponse
from schemas.events import JobState

# The prefix lives on the router (not on `include_router`) so that each route's `path` is
# its full template, which the metrics middleware uses as the `route` label.
router = APIRouter(prefix="/api/v1", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 503)
}


@router.post(
    "/upload",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses=_ERRORS,
    summary="Submit an image (multipart field `file`) for captioning",
)
async def upload(
    file: UploadFile,
    response: Response,
    view: ViewDep,
    publisher: PublisherDep,
    blobs: BlobsDep,
    limits: LimitsDep,
    metrics: MetricsDep,
) -> JobAccepted:
    # Read one byte past the limit: enough to know it is too large, never the whole body.
    data = await file.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image exceeds the limit of {limits.max_bytes} bytes")
    try:
        state, _ = await submit_image(
            data, file.filename, limits=limits, blobs=blobs, publisher=publisher
        )
    except KafkaError as exc:
        raise BrokerError(f"job not accepted, Kafka is unavailable: {exc}") from exc
    view.apply(state)  # visible on this replica at once; others see it from the topic
    metrics.jobs_submitted.labels("upload").inc()
    response.headers["Location"] = f"/api/v1/status/{state.job_id}"
    return JobAccepted(job_id=state.job_id, status=state.status, submitted_at=state.submitted_at)


def _known(view: ViewDep, job_id: str) -> JobState:
    state = view.get(job_id)
    if state is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id!r} not found")
    return state


@router.get(
    "/status/{job_id}",
    response_model=JobStatusResponse,
    responses={404: {"model": ErrorResponse}},
    summary="The current status of a job",
)
async def job_status(job_id: str, view: ViewDep) -> JobStatusResponse:
    return JobStatusResponse.from_state(_known(view, job_id))


@router.websocket("/ws/{job_id}")
async def follow_job(
    websocket: WebSocket, job_id: str, view: WsViewDep, metrics: WsMetricsDep
) -> None:
    """Send the job's current state, then every change; close after the terminal one."""
    with metrics.websockets_open.track_inprogress():
        await _follow(websocket, job_id, view)


async def _follow(websocket: WebSocket, job_id: str, view: JobView) -> None:
    await websocket.accept()
    with view.subscribe(job_id) as changes:
        state = view.get(job_id)
        if state is None:
            await websocket.send_json({"detail": f"job {job_id!r} not found"})
            await websocket.close(code=4404)
            return
        # Waiting only for job changes would never notice a client that left while its
        # job stays pending: the handler (and its subscription) would live on forever.
        gone = asyncio.create_task(_client_gone(websocket), name=f"ws-{job_id}-receive")
        try:
            while True:
                await websocket.send_text(JobStatusResponse.from_state(state).model_dump_json())
                if state.status.terminal:
                    break
                change = asyncio.ensure_future(changes.get())
                await asyncio.wait({change, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not change.done():
                    change.cancel()
                    return  # the client went away
                state = change.result()
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            await websocket.close()
        except WebSocketDisconnect:
            pass
        finally:
            gone.cancel()


async def _client_gone(websocket: WebSocket) -> None:
    """Return when the client disconnects (messages from it are ignored)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
