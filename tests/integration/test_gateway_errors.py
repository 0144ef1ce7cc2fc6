"""Bad requests get a clear 4xx with a JSON `detail`, through the real HTTP server."""

from __future__ import annotations

import pytest
import websockets

from tests.helpers.images import make_noise_png
from tests.integration.stack import Gateway, Stack


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Gateway:
    return stack.start_gateway()


@pytest.mark.parametrize(
    ("data", "filename", "code", "needle"),
    [
        (b"plain text", "notes.txt", 415, "not a supported image"),
        (b"GIF89a but not really an image", "cat.jpg", 415, "not a supported image"),
        (make_noise_png()[:20_000], "cut.png", 415, "truncated"),
        (b"\0" * (5 * 1024 * 1024 + 1), "huge.png", 413, "limit"),
    ],
    ids=["not-an-image", "fake-image", "truncated", "oversized"],
)
def test_rejected_uploads(
    gateway: Gateway, data: bytes, filename: str, code: int, needle: str
) -> None:
    response = gateway.upload(data, filename)
    assert response.status_code == code, response.text
    assert needle in response.json()["detail"]


def test_unknown_job_is_404(gateway: Gateway) -> None:
    response = gateway.status("no-such-job")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


async def test_unknown_job_websocket_closes_with_detail(gateway: Gateway) -> None:
    async with websockets.connect(f"{gateway.ws_url}/api/v1/ws/no-such-job") as ws:
        message = await ws.recv()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert "not found" in str(message)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4404
