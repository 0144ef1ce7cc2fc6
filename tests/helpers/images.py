"""Small generated images to submit."""

from __future__ import annotations

import io
import os

from PIL import Image


def make_png(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def make_noise_png(width: int = 128, height: int = 128) -> bytes:
    """A PNG that does not compress away (for truncation tests)."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, "PNG")
    return buf.getvalue()
