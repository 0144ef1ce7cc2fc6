"""Synthetic photo-sized test images (speed does not depend on what they show)."""

from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image


def synthetic_jpegs(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs: smooth random colour fields, like a blurry photo."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        small = Image.frombytes("RGB", (8, 6), rng.randbytes(8 * 6 * 3))
        buf = io.BytesIO()
        small.resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


@dataclass(frozen=True)
class DecodeComparison:
    """Seconds to decode and preprocess the same photos whole and JPEG-drafted (fastest
    of the rounds), as the worker does before the model runs."""

    images: int
    size: tuple[int, int]
    whole_s: float
    drafted_s: float

    @property
    def speedup(self) -> float:
        return self.whole_s / self.drafted_s

    def note(self) -> str:
        w, h = self.size
        return (
            f"Decoding + preprocessing {self.images} JPEG photos of {w}x{h} "
            f"({w * h / 1e6:.0f} MP, what phones take): {self.whole_s:.2f} s decoded whole, "
            f"{self.drafted_s:.2f} s drafted by the JPEG decoder to the model's input size "
            f"(what the worker does, `processor.pipeline.decode_rgb`): **{self.speedup:.1f}x**. "
            "The timed images above are 640x480, where drafting changes nothing."
        )


def compare_decoding(
    image_processor: Any,
    input_size: tuple[int, int],
    *,
    count: int = 16,
    size: tuple[int, int] = (4000, 3000),
    rounds: int = 2,
) -> DecodeComparison:
    """Time `decode_rgb` + the model's image processor on `count` large JPEGs, whole and
    drafted to `input_size`, alternating, fastest of `rounds` each."""
    from captionstream.processor.pipeline import decode_rgb

    photos = synthetic_jpegs(count, size=size, seed=4)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for drafted in (False, True):
            started = time.perf_counter()
            images = [
                decode_rgb(p, max_pixels=10**9, draft_to=input_size if drafted else None)
                for p in photos
            ]
            image_processor(images=images, return_tensors="pt")
            best[drafted] = min(best[drafted], time.perf_counter() - started)
    return DecodeComparison(count, size, best[False], best[True])
