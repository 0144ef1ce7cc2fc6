"""Synthetic photo-sized test images (speed does not depend on what they show)."""

from __future__ import annotations

import io
import random

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
