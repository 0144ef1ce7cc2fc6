"""The worker's thread count: every core only where it pays (processor/threads.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from PIL.Image import Image

from captionstream.processor.threads import MIN_SPEEDUP, choose_threads, settle_threads
from captionstream.schemas.events import GenerationOptions


def test_many_threads_are_kept_only_when_clearly_faster() -> None:
    assert choose_threads(one_thread_s=1.7, all_cores_s=1.0, cores=2) == 2
    assert choose_threads(one_thread_s=1.1, all_cores_s=1.0, cores=2) == 1
    assert choose_threads(one_thread_s=MIN_SPEEDUP, all_cores_s=1.0, cores=4) == 4
    assert choose_threads(one_thread_s=9.0, all_cores_s=1.0, cores=1) == 1


class TimedCaptioner:
    """Takes `seconds[threads]` per caption call, at the thread count last set."""

    name = "timed"

    def __init__(self, seconds: dict[int, float]) -> None:
        self.seconds = seconds
        self.threads = 0
        self.calls: list[int] = []

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def caption(self, images: Sequence[Image], options: Sequence[GenerationOptions]) -> list[str]:
        assert len(images) == len(options) == 1
        assert options[0].max_new_tokens is not None, "a short caption, not a whole one"
        self.calls.append(self.threads)
        time.sleep(self.seconds[self.threads])
        return ["x"]


@pytest.mark.parametrize(
    ("seconds", "kept"),
    [
        ({1: 0.06, 2: 0.03}, 2),  # a large model: twice as fast on two cores
        ({1: 0.03, 2: 0.03}, 1),  # a small one: no faster, so the cores go to others
    ],
)
def test_settle_measures_both_and_leaves_the_better_set(
    seconds: dict[int, float], kept: int
) -> None:
    captioner = TimedCaptioner(seconds)
    choice = settle_threads(captioner, 2, captioner.set_threads)
    assert choice.threads == kept
    assert captioner.threads == kept, "the choice is what stays set"
    assert captioner.calls == [1, 1, 1, 2, 2, 2], "a warm-up and two timed calls each"
    assert choice.one_thread_s == pytest.approx(seconds[1], abs=0.02)


def test_one_core_needs_no_measurement() -> None:
    captioner = TimedCaptioner({1: 0.0})
    assert settle_threads(captioner, 1, captioner.set_threads).threads == 1
    assert captioner.calls == []
