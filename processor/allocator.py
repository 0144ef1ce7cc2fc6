"""glibc malloc tuning for the worker process (`CAPTIONSTREAM_MALLOC_TUNING`).

With glibc's defaults, the model's large activation buffers (tens to hundreds of MiB per
batch) are `mmap`ed and handed back to the kernel when freed, or trimmed off the heap
top, so every batch faults the same memory in again: 70k-230k minor page faults per
image on the benchmark model, up to a quarter of the batch time, and it varies from run
to run. `tune_malloc` tells glibc to keep that memory instead (the `mallopt` equivalent
of `MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=... MALLOC_TRIM_THRESHOLD_=...
MALLOC_TOP_PAD_=...`), from inside the process, so `captionstream worker`, `captionstream
up` and the Docker image all get it without environment juggling.

The cost is memory: up to `keep_bytes` of freed heap stays with the process (resident
once touched) instead of going back to the system between batches.

Setting `M_MMAP_THRESHOLD` also switches off glibc's dynamic threshold (which would
otherwise only ever rise to 32 MiB, below the largest buffers). Call `tune_malloc`
early, before the inference thread and torch's threads allocate: `M_ARENA_MAX` only
limits arenas created after it.

Nothing happens on other C libraries (musl, macOS), or when the environment already
sets glibc's malloc variables: those are an explicit choice and win.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

# <malloc.h> parameter numbers (glibc).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# Above the largest activation buffer (BLIP-base, batch 16, fp32: 256 MiB of attention
# scores), so none of them is mmapped.
DEFAULT_KEEP_BYTES = 1_000_000_000

# Environment variables through which glibc's malloc is configured at start-up.
MALLOC_ENV = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


@dataclass(frozen=True, slots=True)
class MallocTuning:
    """What `tune_malloc` did: `applied` parameters, or why it did nothing."""

    applied: dict[str, int]
    skipped: str | None = None


def malloc_env(environ: Mapping[str, str]) -> list[str]:
    """The glibc malloc settings present in `environ` (they take precedence over ours)."""
    found = [f"{name}={environ[name]}" for name in MALLOC_ENV if name in environ]
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        found.append(f"GLIBC_TUNABLES={tunables}")
    return found


def load_glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (it has `mallopt` and says its version)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def tune_malloc(
    enabled: bool = True,
    *,
    keep_bytes: int = DEFAULT_KEEP_BYTES,
    environ: Mapping[str, str] | None = None,
    libc: ctypes.CDLL | None = None,
) -> MallocTuning:
    """Make glibc malloc keep up to `keep_bytes` of freed memory; logs what it did once.

    `libc` is for tests (default: this process's, if it is glibc)."""
    result = _tune(enabled, keep_bytes, os.environ if environ is None else environ, libc)
    if result.skipped is None:
        log.info(
            "malloc tuning: %s (CAPTIONSTREAM_MALLOC_TUNING=false turns it off)",
            " ".join(f"{k}={v}" for k, v in result.applied.items()),
        )
    else:
        log.info("malloc tuning off: %s", result.skipped)
    return result


def _tune(
    enabled: bool, keep_bytes: int, environ: Mapping[str, str], libc: ctypes.CDLL | None
) -> MallocTuning:
    if not enabled:
        return MallocTuning({}, skipped="CAPTIONSTREAM_MALLOC_TUNING=false")
    present = malloc_env(environ)
    if present:
        return MallocTuning({}, skipped="the environment sets it: " + " ".join(present))
    libc = libc or load_glibc()
    if libc is None:
        return MallocTuning({}, skipped="not glibc")
    keep = max(0, min(keep_bytes, 2**31 - 1))  # mallopt takes a C int
    wanted = {
        "M_ARENA_MAX": (M_ARENA_MAX, 1),
        "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, keep),
        "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, keep),
        "M_TOP_PAD": (M_TOP_PAD, keep),
    }
    applied: dict[str, int] = {}
    refused: list[str] = []
    for name, (param, value) in wanted.items():
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[name] = value
        else:
            refused.append(name)
    if refused:
        return MallocTuning(applied, skipped="mallopt refused " + ", ".join(refused))
    return MallocTuning(applied)
