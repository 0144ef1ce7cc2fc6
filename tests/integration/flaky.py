"""A captioner plugin for fault tests (CAPTIONSTREAM_CAPTIONER=tests.integration.flaky:create).

It wraps the real tiny BLIP and fails by image colour, the way a GPU out-of-memory or a
driver hiccup fails: a RuntimeError out of the model call.
- top-left pixel FLAKY_ONCE: the first attempt fails, the next succeeds;
- top-left pixel ALWAYS_FAILS: every attempt fails.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captionstream.processor.captioner import BlipCaptioner
from captionstream.schemas.events import GenerationOptions
from captionstream.settings import ProcessorSettings

FLAKY_ONCE = (255, 0, 255)
ALWAYS_FAILS = (255, 0, 254)


class FlakyCaptioner:
    def __init__(self, inner: BlipCaptioner) -> None:
        self.inner = inner
        self.name = inner.name
        self.failed_once: set[bytes] = set()

    def caption(self, images: Sequence[Any], options: Sequence[GenerationOptions]) -> list[str]:
        for image in images:
            pixel = image.getpixel((0, 0))
            fingerprint = image.tobytes()
            if pixel == ALWAYS_FAILS:
                raise RuntimeError("injected fault: this image always fails")
            if pixel == FLAKY_ONCE and fingerprint not in self.failed_once:
                self.failed_once.add(fingerprint)
                raise RuntimeError("injected fault: first attempt fails")
        return self.inner.caption(images, options)


def create(settings: ProcessorSettings) -> FlakyCaptioner:
    return FlakyCaptioner(
        BlipCaptioner.load(settings.model, data_dir=settings.data_dir, device="cpu")
    )


class SlowCaptioner:
    """Tiny BLIP plus a fixed delay per image, so that batches are in flight long enough
    to kill a worker in the middle of one. While a batch runs, the file
    `<data_dir>/inflight-<pid>` exists, so a test can kill at exactly that moment."""

    def __init__(self, inner: BlipCaptioner, seconds_per_image: float, marker: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.seconds_per_image = seconds_per_image
        self.marker = marker

    def caption(self, images: Sequence[Any], options: Sequence[GenerationOptions]) -> list[str]:
        self.marker.touch()
        try:
            time.sleep(self.seconds_per_image * len(images))
            return self.inner.caption(images, options)
        finally:
            self.marker.unlink(missing_ok=True)


def create_slow(settings: ProcessorSettings) -> SlowCaptioner:
    inner = BlipCaptioner.load(settings.model, data_dir=settings.data_dir, device="cpu")
    delay = float(os.environ.get("CAPTIONSTREAM_TEST_SECONDS_PER_IMAGE", "0.02"))
    return SlowCaptioner(inner, delay, settings.data_dir / f"inflight-{os.getpid()}")
