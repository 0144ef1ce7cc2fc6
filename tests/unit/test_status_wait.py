"""`GET /api/v1/status/{job_id}`: `Retry-After` while a job is unfinished, and `?wait=N`
held on the job view's change subscription until the job finishes or N seconds pass.
The real gateway app (no lifespan, so no Kafka) over a real `JobView`, given to the routes
in place of the connected gateway's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from captionstream.gateway.app import create_app
from captionstream.gateway.deps import job_view
from captionstream.gateway.push import STATUS_RETRY_AFTER_S, STATUS_WAIT_MAX_S
from captionstream.gateway.view import JobView
from captionstream.schemas.events import JobState, JobStatus, utcnow
from captionstream.settings import GatewaySettings
from tests.unit.uvicorn_server import serving

JOB = "job-1"


class CountingView(JobView):
    """A real `JobView` that also counts the change subscriptions open right now."""

    def __init__(self) -> None:
        super().__init__()
        self.open_subscriptions = 0

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Queue[JobState]]:
        self.open_subscriptions += 1
        try:
            with super().subscribe(job_id) as queue:
                yield queue
        finally:
            self.open_subscriptions -= 1


@pytest.fixture
def view() -> CountingView:
    return CountingView()


@pytest.fixture
def app(view: CountingView) -> FastAPI:
    app = create_app(GatewaySettings())
    app.dependency_overrides[job_view] = lambda: view
    return app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
        yield http


def pending() -> JobState:
    return JobState.pending(JOB, utcnow())


def at(status: JobStatus, state: JobState | None = None) -> JobState:
    state = state or pending()
    if status is JobStatus.PENDING:
        return state
    started = state.advance(JobStatus.STARTED)
    if status is JobStatus.STARTED:
        return started
    if status is JobStatus.SUCCESS:
        return started.advance(JobStatus.SUCCESS, caption="a cat")
    if status is JobStatus.FAILURE:
        return started.advance(JobStatus.FAILURE, error="bad image")
    return started.advance(JobStatus.RETRY, error="worker lost")


async def status(client: httpx.AsyncClient, **params: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.get(f"/api/v1/status/{JOB}", params=params)
    return response, time.monotonic() - started


@pytest.mark.parametrize("state", [JobStatus.PENDING, JobStatus.STARTED, JobStatus.RETRY])
async def test_an_unfinished_job_says_when_to_ask_again(
    view: CountingView, client: httpx.AsyncClient, state: JobStatus
) -> None:
    view.apply(at(state))
    response, _ = await status(client)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == state.value
    assert response.headers["retry-after"] == str(STATUS_RETRY_AFTER_S)
    assert int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("state", [JobStatus.SUCCESS, JobStatus.FAILURE])
async def test_a_finished_job_has_no_retry_after(
    view: CountingView, client: httpx.AsyncClient, state: JobStatus
) -> None:
    view.apply(at(state))
    response, _ = await status(client)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == state.value
    assert "retry-after" not in response.headers


async def test_wait_answers_as_soon_as_the_job_finishes(
    view: CountingView, client: httpx.AsyncClient
) -> None:
    view.apply(pending())
    request = asyncio.create_task(status(client, wait=20))
    await asyncio.sleep(0.3)
    assert not request.done(), "held while the job is unfinished"
    assert view.open_subscriptions == 1
    view.apply(at(JobStatus.STARTED))  # a change, not the end: still held
    await asyncio.sleep(0.2)
    assert not request.done()
    view.apply(at(JobStatus.SUCCESS))
    response, elapsed = await asyncio.wait_for(request, 5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "SUCCESS"
    assert body["result"] == {"caption": "a cat"}
    assert "retry-after" not in response.headers
    assert elapsed < 3, f"answered {elapsed:.1f} s in, not at the 20 s bound"
    assert view.open_subscriptions == 0


async def test_wait_on_a_job_that_does_not_finish_answers_after_the_wait(
    view: CountingView, client: httpx.AsyncClient
) -> None:
    view.apply(pending())

    async def start_it() -> None:
        await asyncio.sleep(0.2)
        view.apply(at(JobStatus.STARTED))

    starter = asyncio.create_task(start_it())
    response, elapsed = await status(client, wait=1.2)
    await starter
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "STARTED", "the status it reached meanwhile"
    assert response.headers["retry-after"] == str(STATUS_RETRY_AFTER_S)
    assert 1.2 <= elapsed < 3, elapsed
    assert view.open_subscriptions == 0


async def test_wait_on_a_finished_job_and_wait_zero_answer_at_once(
    view: CountingView, client: httpx.AsyncClient
) -> None:
    view.apply(pending())
    response, elapsed = await status(client, wait=0)
    assert (response.status_code, response.json()["status"]) == (200, "PENDING")
    assert response.headers["retry-after"] == str(STATUS_RETRY_AFTER_S)
    assert elapsed < 0.5

    view.apply(at(JobStatus.SUCCESS))
    response, elapsed = await status(client, wait=STATUS_WAIT_MAX_S)
    assert (response.status_code, response.json()["status"]) == (200, "SUCCESS")
    assert elapsed < 0.5
    assert view.open_subscriptions == 0


@pytest.mark.parametrize("wait", [str(STATUS_WAIT_MAX_S + 1), "-1", "soon", "nan", "inf"])
async def test_wait_out_of_range_is_422(
    view: CountingView, client: httpx.AsyncClient, wait: str
) -> None:
    view.apply(pending())
    response, elapsed = await status(client, wait=wait)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", "wait"]
    assert elapsed < 0.5


async def test_wait_on_an_unknown_job_is_404_at_once(client: httpx.AsyncClient) -> None:
    response, elapsed = await status(client, wait=10)
    assert response.status_code == 404
    assert response.json() == {"detail": f"job {JOB!r} not found"}
    assert elapsed < 0.5


async def test_a_job_that_expires_during_the_wait_is_404(
    view: CountingView, client: httpx.AsyncClient
) -> None:
    """Expiry ends the wait at once: the job is gone, as a status request without `wait`
    would find."""
    view.apply(pending())

    async def expire() -> None:
        await asyncio.sleep(0.2)
        view.forget(JOB)

    expiring = asyncio.create_task(expire())
    response, elapsed = await status(client, wait=10)
    await expiring
    assert elapsed < 2, "the expiry ended the wait, not the 10 s"
    assert response.status_code == 404
    assert response.json() == {"detail": f"job {JOB!r} not found"}
    assert view.open_subscriptions == 0


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_client_that_leaves_during_the_wait_leaves_no_subscription(
    view: CountingView, app: FastAPI, http: str
) -> None:
    """A real server: the wait notices the disconnect and ends at once, not at N s."""
    view.apply(pending())
    async with serving(app, http) as url:
        host, port = url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /api/v1/status/{JOB}?wait=30 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        for _ in range(100):
            if view.open_subscriptions == 1:
                break
            await asyncio.sleep(0.02)
        assert view.open_subscriptions == 1, "the request is waiting"
        writer.close()
        left = time.monotonic()
        for _ in range(250):
            if view.open_subscriptions == 0:
                break
            await asyncio.sleep(0.02)
        assert view.open_subscriptions == 0, "the subscription ended with the client"
        assert time.monotonic() - left < 1


async def test_wait_and_retry_after_are_in_the_openapi_document(app: FastAPI) -> None:
    operation = app.openapi()["paths"]["/api/v1/status/{job_id}"]["get"]
    [wait] = [p for p in operation["parameters"] if p["name"] == "wait"]
    assert wait["in"] == "query"
    assert not wait.get("required", False)
    schema = wait["schema"]
    assert (schema["minimum"], schema["maximum"]) == (0, STATUS_WAIT_MAX_S)
    assert "SUCCESS or FAILURE" in wait["description"]
    header = operation["responses"]["200"]["headers"]["Retry-After"]
    assert header["schema"] == {"type": "integer", "minimum": 1}
    assert "PENDING" in header["description"]
