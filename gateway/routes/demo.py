"""The demo page: pick or drop images, watch their captions arrive live.

Three static files (`gateway/static/`), no build step and nothing from outside this
gateway: the page uses only the public API (`POST /api/v1/upload` and the multi-job
WebSocket `/api/v1/ws`), through paths relative to itself.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Everything the page loads comes from this origin; thumbnails are blob: URLs of the
# files the user picked, the (empty) icon a data: URL; the WebSocket is same-origin
# ('self' covers ws/wss).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(tags=["demo"], include_in_schema=False)


def _page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


@router.get("/")
async def index() -> FileResponse:
    """The demo page (also at `/demo`)."""
    return _page()


@router.get("/demo")
async def demo() -> FileResponse:
    return _page()


@router.get("/static/demo.js")
async def script() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "demo.js",
        media_type="text/javascript; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/static/demo.css")
async def stylesheet() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "demo.css",
        media_type="text/css; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
