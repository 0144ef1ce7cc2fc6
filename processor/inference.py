"""The one thread that touches the model: loading, thread settings and every batch.

PyTorch's OpenMP runtime on Linux (libgomp) gives each thread that starts parallel work
its own pool of worker threads. Once it manages more threads than there are CPUs, it
stops spin-waiting at barriers (100 spins instead of 300,000) and puts its workers to
sleep on a futex at every barrier instead. The decoder runs hundreds of small parallel
products per token, so each one then pays a sleep and a wake-up.

The worker used to load the model on the event loop's thread (which made one pool) and
caption on an executor thread (which made a second): on 2 cores that left 0.2-0.5 cores
idle during captioning, and the pipeline ran at 0.68-0.80x the bare model. With every
torch call on this one thread, there is one pool and the cores stay busy
(`tests/unit/test_inference_thread.py` shows the pools; `make bench` the speed).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class InferenceThread:
    """One dedicated thread: the model is not re-entrant, and one batch at a time on all
    cores beats two batches fighting over them."""

    def __init__(self, name: str = "inference") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the thread and wait for it (start-up, before the event loop runs)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the thread; the event loop keeps serving while it does."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
