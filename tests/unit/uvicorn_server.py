"""An ASGI app on a real uvicorn server, in the test's own event loop: for behaviour that
only a real HTTP server and real sockets show (connection reuse, resets, disconnects)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, http: str = "httptools") -> AsyncIterator[str]:
    """Serve `app` with uvicorn (`http`: "httptools" or "h11") on a free port, without
    its lifespan; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # No log_config / log_level: uvicorn would reconfigure its loggers process-wide, and
    # tests that check logging after this one would see its settings.
    config = uvicorn.Config(app, http=http, lifespan="off", log_config=None, log_level=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
