"""The content-hash caption cache: the same image with the same options is answered
from the first job's caption, without the model; other options, or the cache switched
off, go through the model."""

from __future__ import annotations

import httpx

from captionstream.schemas.events import CaptionProduced, decode_caption_event
from captionstream.schemas.topics import TOPICS
from tests.helpers.images import make_png
from tests.integration.stack import Component, Stack, read_topic


async def test_same_content_and_options_is_a_cache_hit(stack: Stack, worker: Component) -> None:
    gateway = stack.start_gateway()
    image = make_png(33, 44, color=(123, 45, 67))
    first = gateway.upload(image, "first.png").json()
    assert first["cache_hit"] is False
    done = gateway.wait_terminal(first["job_id"])
    assert done["status"] == "SUCCESS"

    again = gateway.upload(image, "renamed.jpg.png")
    assert again.status_code == 202
    hit = again.json()
    assert hit["cache_hit"] is True
    assert hit["status"] == "SUCCESS"
    assert hit["job_id"] != first["job_id"]
    status = gateway.status(hit["job_id"]).json()
    assert status["result"] == done["result"]
    assert status["cache_hit"] is True

    # Downstream consumers get a caption event for the cached job too.
    events = [
        decode_caption_event(v) for _, v in await read_topic(stack.bootstrap, TOPICS.captions.name)
    ]
    cached = [e for e in events if e.job_id == hit["job_id"]]
    assert len(cached) == 1
    assert isinstance(cached[0], CaptionProduced)
    assert cached[0].caption == done["result"]["caption"]  # type: ignore[index]

    # Other options: the model runs.
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        response = await client.post(
            "/api/v1/upload", files={"file": ("x.png", image)}, data={"max_new_tokens": "5"}
        )
    other = response.json()
    assert other["cache_hit"] is False
    assert gateway.wait_terminal(other["job_id"])["status"] == "SUCCESS"


def test_cache_can_be_switched_off(stack: Stack, worker: Component) -> None:
    gateway = stack.start_gateway(CAPTIONSTREAM_CAPTION_CACHE="false")
    image = make_png(35, 44, color=(1, 45, 67))
    first = gateway.upload(image).json()
    gateway.wait_terminal(first["job_id"])
    second = gateway.upload(image).json()
    assert second["cache_hit"] is False
    assert second["status"] == "PENDING"
