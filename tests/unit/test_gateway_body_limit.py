"""The body size limit answers 413 before a large body is read, on a real ASGI app
(multipart parsing by Starlette, as in the gateway's upload route)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, UploadFile

from gateway.body_limit import BodySizeLimitMiddleware

LIMIT = 10_000


@pytest.fixture
def app_and_calls() -> tuple[FastAPI, list[int]]:
    app = FastAPI()
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=LIMIT)
    calls: list[int] = []

    @app.post("/upload")
    async def upload(file: UploadFile) -> dict[str, int]:
        size = len(await file.read())
        calls.append(size)
        return {"size": size}

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return app, calls


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_small_bodies_pass(app_and_calls: tuple[FastAPI, list[int]]) -> None:
    app, calls = app_and_calls
    async with client(app) as http:
        response = await http.post("/upload", files={"file": ("a.png", b"x" * 5000)})
        assert response.status_code == 200, response.text
        assert (await http.get("/ping")).json() == {"pong": "yes"}
    assert calls == [5000]


async def test_declared_length_over_the_limit_is_refused_unread(
    app_and_calls: tuple[FastAPI, list[int]],
) -> None:
    app, calls = app_and_calls
    async with client(app) as http:
        response = await http.post("/upload", files={"file": ("a.png", b"x" * 20_000)})
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"request body is {response.request.headers['content-length']} bytes; "
        f"the limit is {LIMIT} bytes"
    }
    assert response.headers["connection"] == "close"
    assert calls == [], "the route never ran"


async def test_streamed_body_is_cut_off_once_past_the_limit(
    app_and_calls: tuple[FastAPI, list[int]],
) -> None:
    app, calls = app_and_calls
    produced = 0

    async def endless_multipart() -> AsyncIterator[bytes]:
        nonlocal produced
        yield (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        while produced < 100 * LIMIT:
            produced += 1000
            yield b"x" * 1000

    async with client(app) as http:
        response = await http.post(
            "/upload",
            content=endless_multipart(),  # no Content-Length: chunked
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
    assert response.status_code == 413, response.text
    assert response.json() == {
        "detail": f"request body passed {LIMIT} bytes; the limit is {LIMIT} bytes"
    }
    assert calls == []
    assert produced < 2 * LIMIT, "reading stopped right after the limit"
