"""All model work on one thread (`processor.inference`): why, and that the worker does it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from captionstream.processor.inference import InferenceThread
from captionstream.settings import ProcessorSettings

ROOT = Path(__file__).resolve().parents[2]


def test_call_and_run_use_one_thread_that_is_not_the_callers() -> None:
    inference = InferenceThread()
    try:
        first = inference.call(threading.get_ident)
        assert first != threading.get_ident()

        async def from_the_loop() -> int:
            return await inference.run(threading.get_ident)

        assert asyncio.run(from_the_loop()) == first
        assert inference.call(threading.get_ident) == first
    finally:
        inference.shutdown()


def test_arguments_pass_through_and_errors_reach_the_caller() -> None:
    inference = InferenceThread()

    def divide(a: int, *, by: int) -> float:
        return a / by

    try:
        assert inference.call(divide, 6, by=3) == 2
        assert asyncio.run(inference.run(divide, 6, by=2)) == 3
        with pytest.raises(ZeroDivisionError):
            inference.call(divide, 1, by=0)
        with pytest.raises(ZeroDivisionError):
            asyncio.run(inference.run(divide, 1, by=0))
        assert inference.call(divide, 1, by=1) == 1  # the thread survives an error
    finally:
        inference.shutdown()


# Counts the process's threads after torch work. libgomp keeps a pool of worker threads
# per thread that ran parallel work: a second pool is what makes it stop spin-waiting
# (more threads than CPUs), so the count shows whether one formed.
_POOLS = textwrap.dedent(
    """
    import os, torch
    from captionstream.processor.inference import InferenceThread

    torch.set_num_threads(2)
    def work():
        a = torch.randn(512, 512)
        return float((a @ a).sum() + torch.nn.functional.gelu(a).sum())

    def threads():
        return len(os.listdir("/proc/self/task"))

    inference = InferenceThread()
    inference.call(work)
    one_pool = threads()
    for _ in range(3):
        inference.call(work)
    repeated = threads()
    work()  # on the main thread, as the worker used to load its model
    print(one_pool, repeated, threads())
    """
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_torch_work_on_the_inference_thread_keeps_one_openmp_pool() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _POOLS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    one_pool, repeated, after_main = map(int, out.stdout.split())
    assert repeated == one_pool  # calls reuse the thread, and with it its pool
    assert after_main == one_pool + 1  # the main thread's work made a second pool


def test_the_worker_sets_threads_and_loads_the_model_on_the_inference_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from captionstream.processor import worker

    seen: dict[str, str] = {}

    class Stop(Exception):
        pass

    def fake_threads(_: object) -> None:
        seen["threads"] = threading.current_thread().name

    def fake_load(_: object) -> object:
        seen["load"] = threading.current_thread().name
        return object()

    def fake_settle(*_: object) -> None:
        seen["settle"] = threading.current_thread().name
        raise Stop

    monkeypatch.setattr(worker, "tune_malloc", lambda *a, **k: None)
    # It would raise Pillow's process-wide pixel cap for the rest of the test session.
    monkeypatch.setattr(worker, "allow_pixels", lambda _: None)
    monkeypatch.setattr(worker, "configure_torch_threads", fake_threads)
    monkeypatch.setattr(worker, "load_captioner", fake_load)
    monkeypatch.setattr(worker, "settle_threads", fake_settle)
    with pytest.raises(Stop):
        worker.run_worker(ProcessorSettings())
    assert seen["threads"] == seen["load"] == seen["settle"]
    assert seen["load"].startswith("inference")
