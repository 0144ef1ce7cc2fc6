"""Children the launchers start (brokers, Kafka nodes) die with the process that started
them, but not with the thread: Linux's parent-death signal follows the starting thread,
so a Kafka node restarted from `asyncio.to_thread` was stopped when that thread ended."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from captionstream.broker import child_preexec, die_with_parent

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="prctl is Linux's")


def start_in_a_thread(preexec: Callable[[], Callable[[], None] | None]) -> subprocess.Popen[bytes]:
    """Start `sleep 30` from a thread that then ends; the child, once the thread is gone."""
    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(
        target=lambda: started.append(subprocess.Popen(["sleep", "30"], preexec_fn=preexec()))
    )
    thread.start()
    thread.join()
    time.sleep(0.5)
    return started[0]


def test_a_child_started_from_a_thread_outlives_the_thread() -> None:
    child = start_in_a_thread(child_preexec)
    try:
        assert child.poll() is None, "the child must outlive the thread that started it"
    finally:
        child.kill()
        child.wait()


def test_the_death_signal_alone_would_have_stopped_it() -> None:
    """The mechanism `child_preexec` avoids, on this kernel."""
    child = start_in_a_thread(lambda: die_with_parent)
    try:
        assert child.wait(timeout=5) == -15  # SIGTERM
    finally:
        child.kill()


def test_a_child_of_the_main_thread_still_gets_the_death_signal() -> None:
    assert child_preexec() is die_with_parent
