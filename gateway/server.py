"""`captionstream gateway`: serve the FastAPI app with uvicorn."""

from __future__ import annotations

import uvicorn

from captionstream.gateway.app import create_app
from captionstream.logging_config import uvicorn_log_config
from captionstream.settings import GatewaySettings


def run_gateway(settings: GatewaySettings) -> None:
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=uvicorn_log_config(settings.log_format),
        timeout_graceful_shutdown=5,
    )
