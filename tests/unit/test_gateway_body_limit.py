"""The body size limit answers 413 before a large body is buffered, on a real ASGI app
(multipart parsing by Starlette, as in the gateway's upload route), and every kind of
client reads that answer from a real uvicorn server, the rest of the body being read
and discarded only within a bound."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captionstream.gateway.app import create_app
from captionstream.gateway.body_limit import (
    DRAIN_LIMIT_FACTOR,
    MULTIPART_OVERHEAD_BYTES,
    BodySizeLimitMiddleware,
)
from captionstream.settings import GatewaySettings
from tests.unit.uvicorn_server import serving

LIMIT = 10_000
# With the ASGI transport a body is read as fast as it is produced: the drain bound
# alone stops it. Half the limit keeps every read body under twice the limit.
DRAIN = LIMIT // 2


@pytest.fixture
def app_and_calls() -> tuple[FastAPI, list[int]]:
    app = FastAPI()
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=LIMIT, drain_bytes=DRAIN)
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
    assert produced >= LIMIT + DRAIN - 1000, "the rest was read (and dropped) up to the bound"


async def test_declared_body_within_the_drain_bound_is_read_and_dropped(
    app_and_calls: tuple[FastAPI, list[int]],
) -> None:
    """The client gets to send all of it (so it can read the answer); the app never
    sees it."""
    app, calls = app_and_calls
    produced = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(12):
            produced += 1000
            yield b"x" * 1000

    async with client(app) as http:
        response = await http.post(
            "/upload",
            content=body(),
            headers={"Content-Length": "12000", "Content-Type": "application/octet-stream"},
        )
    assert response.status_code == 413, response.text
    assert response.json() == {"detail": f"request body is 12000 bytes; the limit is {LIMIT} bytes"}
    assert produced == 12_000
    assert calls == []


# --- every client reads the 413 from a real server -------------------------------------

MIB = 1024 * 1024
# The gateway's defaults: a 5 MiB image, so a 5 MiB + 64 KiB body.
GATEWAY_LIMIT = GatewaySettings().max_upload_bytes + MULTIPART_OVERHEAD_BYTES
UPLOAD = "/api/v1/upload"


class BodyMeter:
    """Outermost ASGI wrapper: counts the body bytes the server hands to the app (what
    the middleware read) and notes each request's client address (its connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.bytes_read = 0
        self.clients: list[Any] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.clients.append(scope["client"])

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.bytes_read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@pytest.fixture
def gateway_app() -> BodyMeter:
    """The real gateway app with its default 5 MiB limit (no lifespan: no Kafka; the
    413 comes before any route, and /healthz needs nothing)."""
    settings = GatewaySettings()
    assert settings.max_upload_bytes == 5 * MIB
    return BodyMeter(create_app(settings))


def multipart(size: int) -> dict[str, Any]:
    return {"files": {"file": ("big.jpg", os.urandom(size), "image/jpeg")}}


def raw(size: int) -> dict[str, Any]:
    return {"content": os.urandom(size), "headers": {"Content-Type": "image/jpeg"}}


BOUNDARY = "captionstream-test"
MULTIPART_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def multipart_pieces(size: int, piece: int = 256 * 1024) -> Iterator[bytes]:
    """A multipart upload of `size` random bytes, in pieces (for a chunked body)."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    for _ in range(size // piece):
        yield os.urandom(piece)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def chunked(size: int) -> dict[str, Any]:
    async def stream() -> AsyncIterator[bytes]:
        for piece in multipart_pieces(size):
            yield piece

    return {"content": stream(), "headers": MULTIPART_TYPE}


BODIES = {"multipart": multipart, "declared": raw, "chunked": chunked}
HTTP_IMPLEMENTATIONS = ["httptools", "h11"]


def assert_is_the_413(status: int, body: Any) -> None:
    assert status == 413, body
    assert isinstance(body, dict)
    assert str(body["detail"]).endswith(f"the limit is {GATEWAY_LIMIT} bytes"), body


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", sorted(BODIES))
async def test_async_client_on_a_reused_connection_reads_the_413(
    gateway_app: BodyMeter, http: str, kind: str
) -> None:
    """The case that failed: `httpx.AsyncClient` sends all 6 MiB before it reads, on a
    connection that served a request already, and got `ReadError` (connection reset)."""
    async with (
        serving(gateway_app, http) as url,
        httpx.AsyncClient(
            base_url=url, timeout=30, limits=httpx.Limits(max_connections=1)
        ) as client,
    ):
        assert (await client.get("/healthz")).status_code == 200
        response = await client.post(UPLOAD, **BODIES[kind](6 * MIB))
        assert_is_the_413(response.status_code, response.json())
        assert response.headers["connection"] == "close"
        assert (await client.get("/healthz")).status_code == 200, "the client carries on"
    first, refused, after = gateway_app.clients
    assert refused == first, "the 413 came on the reused keep-alive connection"
    assert after != first, "and that connection was closed after it"
    assert gateway_app.bytes_read >= 6 * MIB, "the body was read to its end, and dropped"


def _sync_clients(url: str, tmp: Path) -> Iterator[tuple[str, int, Any]]:
    """(client, status, JSON body) for blocking clients, each sending 6 MiB."""
    data = os.urandom(6 * MIB)
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/healthz")
        response = client.post(UPLOAD, files={"file": ("a.jpg", data)})
        yield "httpx", response.status_code, response.json()
        response = client.post(UPLOAD, content=multipart_pieces(6 * MIB), headers=MULTIPART_TYPE)
        yield "httpx chunked", response.status_code, response.json()
    requests = pytest.importorskip("requests")
    with requests.Session() as session:
        session.get(f"{url}/healthz", timeout=30)
        answer = session.post(f"{url}{UPLOAD}", files={"file": ("a.jpg", data)}, timeout=30)
        yield "requests", answer.status_code, answer.json()
        answer = session.post(
            f"{url}{UPLOAD}", data=multipart_pieces(6 * MIB), headers=MULTIPART_TYPE, timeout=30
        )
        yield "requests chunked", answer.status_code, answer.json()


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
async def test_blocking_clients_read_the_413(
    gateway_app: BodyMeter, http: str, tmp_path: Path
) -> None:
    async with serving(gateway_app, http) as url:
        answers = await asyncio.to_thread(lambda: list(_sync_clients(url, tmp_path)))
    assert [name for name, _, _ in answers] == [
        "httpx",
        "httpx chunked",
        "requests",
        "requests chunked",
    ]
    for _, status, body in answers:
        assert_is_the_413(status, body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "args",
    [
        ["-F", "file=@{path}"],  # curl asks `Expect: 100-continue` for a body this big
        ["-H", "Expect:", "-F", "file=@{path}"],  # sends at once, reading as it sends
        ["-H", "Transfer-Encoding: chunked", "-F", "file=@{path}"],
    ],
    ids=["expect-100", "no-expect", "chunked"],
)
async def test_curl_reads_the_413(
    gateway_app: BodyMeter, http: str, args: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(os.urandom(6 * MIB))
    async with serving(gateway_app, http) as url:
        process = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            *(a.format(path=path) for a in args),
            f"{url}{UPLOAD}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
    body, _, code = out.decode().rpartition("\n")
    assert_is_the_413(int(code), json.loads(body))
    assert process.returncode == 0, err


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
async def test_an_endless_body_is_read_only_within_the_bound(
    gateway_app: BodyMeter, http: str
) -> None:
    """100 times the limit, streamed: the server reads at most the limit plus the drain
    bound (then closes the connection), never the whole body."""
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        for piece in multipart_pieces(100 * GATEWAY_LIMIT, piece=MIB):
            produced += len(piece)
            yield piece

    started = time.monotonic()
    async with serving(gateway_app, http) as url, httpx.AsyncClient(base_url=url) as client:
        try:
            response = await client.post(
                UPLOAD, content=endless(), headers=MULTIPART_TYPE, timeout=30
            )
        except httpx.TransportError:  # reset while still sending: expected past the bound
            pass
        else:
            assert_is_the_413(response.status_code, response.json())
    bound = (1 + DRAIN_LIMIT_FACTOR) * GATEWAY_LIMIT
    print(
        f"\n{http}: the server read {gateway_app.bytes_read} bytes of a {100 * GATEWAY_LIMIT}"
        f"-byte body (bound {bound}); the client produced {produced}; "
        f"{time.monotonic() - started:.2f} s"
    )
    assert GATEWAY_LIMIT < gateway_app.bytes_read <= bound + MIB
    assert produced < 10 * GATEWAY_LIMIT, "the client was stopped long before its end"


async def test_declared_body_past_the_bound_is_refused_unread(gateway_app: BodyMeter) -> None:
    """A Content-Length beyond limit + drain bound is answered at once, no byte read."""
    declared = (1 + DRAIN_LIMIT_FACTOR) * GATEWAY_LIMIT + 1
    async with serving(gateway_app, "httptools") as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n"
            "Content-Type: image/jpeg\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert f"request body is {declared} bytes".encode() in answer
    assert gateway_app.bytes_read == 0


async def test_a_client_that_stops_sending_is_let_go_after_the_idle_bound(
    gateway_app: BodyMeter,
) -> None:
    """A client that reads the early 413 and stops sending (without ending its body):
    the answer is complete at once, and the connection closes after the idle bound."""
    async with serving(gateway_app, "httptools") as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: {MULTIPART_TYPE['Content-Type']}\r\n\r\n".encode()
        )
        sent = 0
        for piece in multipart_pieces(100 * GATEWAY_LIMIT, piece=64 * 1024):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            sent += len(piece)
            if sent > GATEWAY_LIMIT + MIB:
                break  # and send nothing more, leaving the body unfinished
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413 "), head
        rest = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        closed_after = time.monotonic() - started
        writer.close()
    assert b"request body passed" in rest
    assert closed_after < 5, f"closed {closed_after:.1f} s after the answer"
