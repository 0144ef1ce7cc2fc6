"""glibc malloc tuning at worker start (`processor.allocator`)."""

from __future__ import annotations

import ctypes
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from captionstream.processor.allocator import (
    DEFAULT_KEEP_BYTES,
    M_ARENA_MAX,
    M_MMAP_THRESHOLD,
    M_TOP_PAD,
    M_TRIM_THRESHOLD,
    load_glibc,
    malloc_env,
    tune_malloc,
)
from captionstream.settings import ProcessorSettings

ROOT = Path(__file__).resolve().parents[2]


class FakeLibc:
    def __init__(self, refuse: frozenset[int] = frozenset()) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def mallopt(self, param: Any, value: Any) -> int:
        self.calls.append((param.value, value.value))
        return 0 if param.value in self.refuse else 1


def fake(libc: FakeLibc) -> ctypes.CDLL:
    return libc  # type: ignore[return-value]


def test_applies_all_four_parameters(caplog: pytest.LogCaptureFixture) -> None:
    libc = FakeLibc()
    with caplog.at_level(logging.INFO, logger="captionstream.processor.allocator"):
        result = tune_malloc(True, keep_bytes=123_456, environ={}, libc=fake(libc))
    assert result.skipped is None
    assert sorted(libc.calls) == sorted(
        [
            (M_ARENA_MAX, 1),
            (M_MMAP_THRESHOLD, 123_456),
            (M_TRIM_THRESHOLD, 123_456),
            (M_TOP_PAD, 123_456),
        ]
    )
    assert result.applied == {
        "M_ARENA_MAX": 1,
        "M_MMAP_THRESHOLD": 123_456,
        "M_TRIM_THRESHOLD": 123_456,
        "M_TOP_PAD": 123_456,
    }
    [record] = caplog.records  # logged once
    assert "M_MMAP_THRESHOLD=123456" in record.getMessage()


def test_disabled_by_the_setting_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    libc = FakeLibc()
    with caplog.at_level(logging.INFO, logger="captionstream.processor.allocator"):
        result = tune_malloc(False, environ={}, libc=fake(libc))
    assert libc.calls == []
    assert result.applied == {}
    assert result.skipped == "CAPTIONSTREAM_MALLOC_TUNING=false"
    [record] = caplog.records
    assert "off" in record.getMessage()


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_ARENA_MAX": "2"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
    ],
)
def test_malloc_variables_in_the_environment_win(environ: dict[str, str]) -> None:
    libc = FakeLibc()
    result = tune_malloc(True, environ=environ, libc=fake(libc))
    assert libc.calls == []
    assert result.skipped is not None
    assert "the environment sets it" in result.skipped


def test_unrelated_glibc_tunables_do_not_count() -> None:
    assert malloc_env({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2", "PATH": "/bin"}) == []


def test_a_refused_parameter_is_reported() -> None:
    libc = FakeLibc(refuse=frozenset({M_MMAP_THRESHOLD}))
    result = tune_malloc(True, environ={}, libc=fake(libc))
    assert result.skipped == "mallopt refused M_MMAP_THRESHOLD"
    assert "M_MMAP_THRESHOLD" not in result.applied


def test_not_glibc_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("captionstream.processor.allocator.load_glibc", lambda: None)
    result = tune_malloc(True, environ={})
    assert result.skipped == "not glibc"


def test_settings_default_on_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTIONSTREAM_MALLOC_TUNING", raising=False)
    monkeypatch.delenv("CAPTIONSTREAM_MALLOC_KEEP_BYTES", raising=False)
    settings = ProcessorSettings()
    assert settings.malloc_tuning is True
    assert settings.malloc_keep_bytes == DEFAULT_KEEP_BYTES
    monkeypatch.setenv("CAPTIONSTREAM_MALLOC_TUNING", "false")
    monkeypatch.setenv("CAPTIONSTREAM_MALLOC_KEEP_BYTES", "500000000")
    settings = ProcessorSettings()
    assert settings.malloc_tuning is False
    assert settings.malloc_keep_bytes == 500_000_000


def test_the_worker_tunes_malloc_before_loading_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run_worker calls tune_malloc with the settings, before torch threads or the model."""
    from captionstream.processor import worker

    order: list[str] = []

    class Stop(Exception):
        pass

    def fake_tune(enabled: bool, *, keep_bytes: int) -> None:
        order.append(f"tune {enabled} {keep_bytes}")

    def fake_threads(_: object) -> None:
        order.append("threads")
        raise Stop

    monkeypatch.setattr(worker, "tune_malloc", fake_tune)
    monkeypatch.setattr(worker, "configure_torch_threads", fake_threads)
    monkeypatch.setenv("CAPTIONSTREAM_MALLOC_TUNING", "false")
    with pytest.raises(Stop):
        worker.run_worker(ProcessorSettings())
    assert order == [f"tune False {DEFAULT_KEEP_BYTES}", "threads"]


_FAULTS = textwrap.dedent(
    """
    import ctypes, resource, sys
    from captionstream.processor.allocator import tune_malloc

    if sys.argv[1] == "tuned":
        assert tune_malloc(True, environ={}).skipped is None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size = 64 * 1024 * 1024  # above glibc's largest dynamic mmap threshold (32 MiB)

    def cycle():
        p = libc.malloc(size)
        libc.memset(p, 1, size)
        libc.free(p)

    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


@pytest.mark.skipif(load_glibc() is None, reason="glibc only")
def test_on_glibc_a_large_malloc_free_cycle_stops_faulting() -> None:
    """In a fresh process (so this one's allocator is left alone): with glibc's defaults
    every 64 MiB malloc/touch/free faults all its pages in again; tuned, none."""

    def faults(mode: str) -> int:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return int(out)

    pages = 3 * 64 * 1024 * 1024 // 4096
    assert faults("default") > pages // 2
    assert faults("tuned") < 100
