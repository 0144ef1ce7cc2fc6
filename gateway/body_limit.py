"""Refuse request bodies over a byte limit while they stream, before they are buffered.

Starlette parses a multipart body completely (spooling file parts to disk) before the
route runs, so a check in the route comes too late: a 2 GB upload would be read and
stored first. This pure ASGI middleware answers 413 with a JSON `detail`:
- when `Content-Length` declares too many bytes, before the app reads any of them;
- otherwise (chunked uploads) as soon as the bytes received pass the limit; whatever the
  app was doing with the body is abandoned, and its answer (if any) is dropped.

The answer must also reach the client. Most clients (httpx, requests) send the whole
body before they read a byte of the answer, and a server that closes a connection with
unread data in it resets it (TCP RST): the client's write fails, and the 413 is lost
(`httpx.AsyncClient` raises `ReadError`). Leaving the rest to uvicorn does not help
either: on a keep-alive connection it reads and discards a body the app left unread,
however long. So the middleware sends the 413 at once (clients that watch for an early
answer, like curl and browsers, stop sending), then reads and discards the rest of the
body itself, through `receive()`, within a bound: at most `drain_bytes` past the limit
(declared bodies longer than that are never read), `drain_seconds` in all, and no more
than `drain_idle_seconds` of silence. The answer ends when the body does (or the bound
is reached), and carries `Connection: close`: past the bound the connection is closed
with the body unread, as a 2 GB upload must not cost 2 GB of reading.
"""

from __future__ import annotations

import asyncio
import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _BodyTooLarge(Exception):
    """Raised from `receive` to abort the app once the body passes the limit."""


# Room for what a multipart upload adds around the image: boundaries, part headers and
# the option fields. The image part itself is then checked exactly by the route.
MULTIPART_OVERHEAD_BYTES = 64 * 1024

# How far past the limit a refused body is still read (and discarded) so that its client
# can read the 413: by default up to five times the limit in all, which covers a phone
# photo several times too large while bounding what an endless upload costs.
DRAIN_LIMIT_FACTOR = 4
# Reading the rest of a refused body stops after this long in all, or after this long
# without a byte (a client that stopped sending when it saw the early 413).
DRAIN_SECONDS = 15.0
DRAIN_IDLE_SECONDS = 2.0


class BodySizeLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        *,
        drain_bytes: int | None = None,
        drain_seconds: float = DRAIN_SECONDS,
        drain_idle_seconds: float = DRAIN_IDLE_SECONDS,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.drain_bytes = (
            DRAIN_LIMIT_FACTOR * max_body_bytes if drain_bytes is None else drain_bytes
        )
        self.drain_seconds = drain_seconds
        self.drain_idle_seconds = drain_idle_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            # Read the body only if it ends within the bound, and only if it is coming:
            # a client that asked `Expect: 100-continue` sends nothing until told to.
            drain = (
                int(declared) <= self.max_body_bytes + self.drain_bytes
                and "100-continue" not in headers.get("expect", "").lower()
            )
            await self._refuse(
                send, f"request body is {declared} bytes", receive if drain else None, 0
            )
            return

        received = 0
        more_body = True
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, more_body, exceeded
            if exceeded:
                raise _BodyTooLarge  # the app insists; the rest of the body is ours
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more_body = bool(message.get("more_body", False))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded and not response_started:
                return  # the app's reaction to the aborted body; ours is the 413
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:  # whatever the aborted read turned into inside the app
            if not exceeded or response_started:
                raise
        if exceeded and not response_started:
            await self._refuse(
                send,
                f"request body passed {self.max_body_bytes} bytes",
                receive if more_body else None,
                received,
            )

    async def _refuse(self, send: Send, what: str, rest: Receive | None, received: int) -> None:
        """Answer 413; with `rest`, read what is left of the body (`received` bytes of
        it came already) within the drain bound before ending the answer."""
        body = json.dumps({"detail": f"{what}; the limit is {self.max_body_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        if rest is None:
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.body", "body": body, "more_body": True})
        try:
            await self._drain(rest, received)
        finally:
            await send({"type": "http.response.body", "body": b""})

    async def _drain(self, receive: Receive, received: int) -> None:
        """Read and discard the body until it ends, the client leaves, or the bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_seconds
        bound = self.max_body_bytes + self.drain_bytes
        while received <= bound:
            timeout = min(self.drain_idle_seconds, deadline - loop.time())
            if timeout <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return  # http.disconnect
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
