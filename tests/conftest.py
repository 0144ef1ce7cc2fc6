"""Shared fixtures. Integration fixtures start real processes against a real broker."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from tests.helpers.images import make_png

# Never reach for a model hub from tests (also inherited by spawned processes).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
