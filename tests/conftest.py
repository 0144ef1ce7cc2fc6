"""Shared fixtures. Integration fixtures start real processes against a real broker."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

if TYPE_CHECKING:
    from processor.captioner import BlipCaptioner

# Never reach for a model hub from tests (also inherited by spawned processes).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def go_offline(mp: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: make the running process agree.
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def load_tiny_blip(data_dir: Path, **options: Any) -> BlipCaptioner:
    """The tiny random BLIP on the CPU, loaded offline."""
    from processor.captioner import BlipCaptioner
    from processor.tiny_blip import TINY_BLIP

    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp)
        return BlipCaptioner.load(TINY_BLIP, data_dir=data_dir, device="cpu", **options)


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


# The count of integration tests per Kafka broker at the end of a run. Here, not in
# tests/integration/conftest.py (which tags each test with its broker): with pytest-xdist
# only this file is loaded by the process that reports.
_ran: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    broker = dict(report.user_properties).get("kafka_broker")
    if report.when == "call" and report.passed and broker is not None:
        _ran[str(broker)] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _ran:
        ran = ", ".join(f"{kind}: {count}" for kind, count in sorted(_ran.items()))
        terminalreporter.write_line(f"integration tests passed per Kafka broker: {ran}")
