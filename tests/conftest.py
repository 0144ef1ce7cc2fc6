"""Shared fixtures. Integration fixtures start real processes against a real broker."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

# Never reach for a model hub from tests (also inherited by spawned processes).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture
def png_bytes() -> bytes:
    return make_png()
