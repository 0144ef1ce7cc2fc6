"""Push channels: how a client hears of a job's changes as they happen, without polling.

Three ways, all on `JobView.follow` (each change is pushed to its subscribers): a status
request held with `?wait=`, Server-Sent Events, and WebSockets (one job, or many on one
socket). Each subscription ends with its client: a client that leaves while its job
stays pending must not leave a handler (and its subscription) behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine
from typing import Annotated, Any

from fastapi import Query, Request, WebSocket
from fastapi.responses import StreamingResponse
from starlette.websockets import WebSocketDisconnect

from captionstream.gateway.view import JobView
from captionstream.schemas.api import JobStatusResponse
from captionstream.schemas.events import JobState

# `?wait=` is bounded so that a held request stays well inside the read timeouts of
# clients and proxies (often 60 s or more); a client wanting longer asks again.
STATUS_WAIT_MAX_S = 60
# Polling clients are told to ask again after this long: a model run takes about a
# second, and Retry-After has whole seconds, so 1 s means no finished job is noticed late
# by more than a second. Clients that want no delay at all use `?wait=` or a push channel.
STATUS_RETRY_AFTER_S = 1

StatusWait = Annotated[
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
]

# Ids longer than this in a WebSocket follow request are ignored: no job id is that long.
MAX_JOB_ID_LENGTH = 200


# --- a status request held until the job finishes ---------------------------------------


async def until_finished(view: JobView, job_id: str, timeout_s: float, request: Request) -> None:
    """Return when the view shows the job terminal, after `timeout_s`, or as soon as the
    client disconnects. The subscription ends with this call, whichever way it returns."""

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


# --- Server-Sent Events -------------------------------------------------------------------


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


def status_events(view: JobView, job_id: str) -> EventStreamResponse:
    """One `status` event with the job's current state, one per change, and the end of
    the stream after the terminal state. Proxies are asked not to buffer or cache it."""

    async def stream() -> AsyncIterator[str]:
        async for state in view.follow(job_id):
            body = JobStatusResponse.from_state(state).model_dump_json()
            yield f"event: status\nid: {state.updated_at.isoformat()}\ndata: {body}\n\n"

    return EventStreamResponse(
        stream(),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# --- WebSockets ---------------------------------------------------------------------------


async def follow_one(websocket: WebSocket, view: JobView, job_id: str) -> None:
    """Accept; send the job's current state, then every change; close after the
    terminal one (code 4404 after a `detail` message for an unknown job)."""
    await websocket.accept()
    if view.get(job_id) is None:
        await websocket.send_json({"detail": f"job {job_id!r} not found"})
        await websocket.close(code=4404)
        return
    await _until_client_gone(websocket, _forward(websocket, view.follow(job_id)))
    await _close_quietly(websocket)


async def follow_many(websocket: WebSocket, view: JobView) -> None:
    """Accept; then every `{"follow": [job ids]}` the client sends adds jobs whose states
    are forwarded (an unknown id gets a `detail` message naming it), until the client
    closes the socket."""
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
    """The job ids of a `{"follow": [...]}` message; anything else asks for nothing."""
    try:
        body = json.loads(text or "")
    except ValueError:
        return []
    ids = body.get("follow") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        return []
    return [i for i in ids if isinstance(i, str) and 0 < len(i) <= MAX_JOB_ID_LENGTH]


async def _forward(websocket: WebSocket, states: AsyncIterator[JobState]) -> None:
    async for state in states:
        await websocket.send_text(JobStatusResponse.from_state(state).model_dump_json())


async def _until_client_gone(websocket: WebSocket, work: Coroutine[Any, Any, None]) -> None:
    """Run `work`, but stop it as soon as the client disconnects.

    Waiting only for job changes would never notice a client that left while its job
    stays pending: the handler (and its subscription) would live on forever.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(_websocket_client_gone(websocket))
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


async def _websocket_client_gone(websocket: WebSocket) -> None:
    """Return when the client disconnects (messages from it are ignored)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
