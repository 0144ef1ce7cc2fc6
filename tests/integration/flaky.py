"""A captioner plugin for fault tests (CAPTIONSTREAM_CAPTIONER=tests.integration.flaky:create).

It wraps the real tiny BLIP and fails by image colour, the way a GPU out-of-memory or a
driver hiccup fails: a RuntimeError out of the model call.
- top-left pixel FLAKY_ONCE: the first attempt fails, the next succeeds;
- top-left pixel ALWAYS_FAILS: every attempt fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from captionstream.settings import ProcessorSettings
from processor.captioner import BlipCaptioner
from schemas.events import GenerationOptions

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
