"""How many CPU threads the model gets: every core, unless one thread captions as fast.

Sharing an operation between threads pays only when the operation is large enough. For
a full-size model it is (BLIP-base: about 1.7x faster on 2 cores than on 1); for a small
one it is not, and the extra threads cost the machine anyway: between operations they
spin-wait on their cores (processor/inference.py says why they must), and a gateway or
broker on the same cores waits for them. Measured on 2 cores with the tiny model under
20 clients polling every 20 ms: 8.5 jobs/s on 2 threads, 24.7 on 1
(bench/RESULTS-polling.md).

So the worker times one short caption on every core and on one, at start-up, and keeps
one thread unless the many are clearly faster. A set `CAPTIONSTREAM_TORCH_THREADS`
skips the measurement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from captionstream.processor.captioner import Captioner
from captionstream.schemas.events import GenerationOptions

log = logging.getLogger(__name__)

# Many threads must caption at least this much faster than one to be kept: below it, the
# cores they hold are worth more to the processes beside the worker.
MIN_SPEEDUP = 1.3
# Short: the measurement is about the cost of one operation, not of a whole caption.
PROBE_OPTIONS = GenerationOptions(max_new_tokens=4)


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    threads: int
    one_thread_s: float
    all_cores_s: float

    @property
    def speedup(self) -> float:
        return self.one_thread_s / self.all_cores_s


def choose_threads(one_thread_s: float, all_cores_s: float, cores: int) -> int:
    """All `cores` when they caption at least MIN_SPEEDUP times faster than one thread."""
    if cores > 1 and one_thread_s >= MIN_SPEEDUP * all_cores_s:
        return cores
    return 1


def time_caption(captioner: Captioner, set_threads: Callable[[int], None], threads: int) -> float:
    """Seconds for one short caption on `threads` threads: the best of two, after a
    warm-up at that thread count."""
    set_threads(threads)
    image = Image.new("RGB", (384, 384), (120, 110, 100))
    captioner.caption([image], [PROBE_OPTIONS])  # warm-up: pools, caches, lazy set-up
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        captioner.caption([image], [PROBE_OPTIONS])
        best = min(best, time.perf_counter() - started)
    return best


def settle_threads(
    captioner: Captioner, cores: int, set_threads: Callable[[int], None]
) -> ThreadChoice:
    """Time the captioner on one thread and on `cores`, keep the better (see the module
    docstring) and leave it set. Call on the inference thread, after loading."""
    if cores <= 1:
        set_threads(1)
        return ThreadChoice(1, 0.0, 0.0)
    one = time_caption(captioner, set_threads, 1)
    many = time_caption(captioner, set_threads, cores)
    choice = ThreadChoice(choose_threads(one, many, cores), one, many)
    set_threads(choice.threads)
    log.info(
        "torch intra-op threads: %d (a short caption took %.0f ms on 1 thread, %.0f ms "
        "on %d: %.2fx; more than 1 only from %.1fx)",
        choice.threads,
        one * 1000,
        many * 1000,
        cores,
        choice.speedup,
        MIN_SPEEDUP,
    )
    return choice
