"""Refuse request bodies over a byte limit while they stream, before they are buffered.

Starlette parses a multipart body completely (spooling file parts to disk) before the
route runs, so a check in the route comes too late: a 2 GB upload would be read and
stored first. This pure ASGI middleware answers 413 with a JSON `detail`:
- at once, without reading the body, when `Content-Length` declares too many bytes;
- otherwise (chunked uploads) as soon as the bytes received pass the limit; whatever the
  app was doing with the body is abandoned, and its answer (if any) is dropped.
The response closes the connection, so the rest of the body is never read.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _BodyTooLarge(Exception):
    """Raised from `receive` to abort the app once the body passes the limit."""


# Room for what a multipart upload adds around the image: boundaries, part headers and
# the option fields. The image part itself is then checked exactly by the route.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(send, f"request body is {declared} bytes")
            return

        received = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
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
            await self._refuse(send, f"request body passed {self.max_body_bytes} bytes")

    async def _refuse(self, send: Send, what: str) -> None:
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
        await send({"type": "http.response.body", "body": body})
