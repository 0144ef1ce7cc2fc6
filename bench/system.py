"""The machine: its description for the report, and CPU time used by other processes.

The benchmark may share its cores with other work (on a 2-core box, a test run halves
throughput). `CpuMeter` measures how many cores were busy with processes that are not
ours during a measurement, so the report can say whether a number was disturbed. Linux
only (/proc); elsewhere it reports nothing rather than guessing.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# Other processes using more than this many cores during a measurement: it is disturbed.
DISTURBED_CORES = 0.25

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class MachineTicks:
    """CPU time of the whole machine, in clock ticks, from /proc/stat's `cpu` line.

    busy = user + nice + system + irq + softirq (guest time is already inside user);
    idle = idle + iowait: no thread wanted the core; stolen = steal: a thread wanted it,
    but the hypervisor ran another guest.
    """

    busy: int
    idle: int
    stolen: int


def machine_ticks_from_proc_stat(text: str) -> MachineTicks:
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            user, nice, system, idle, iowait, irq, softirq = (int(v) for v in parts[1:8])
            steal = int(parts[8]) if len(parts) > 8 else 0
            return MachineTicks(user + nice + system + irq + softirq, idle + iowait, steal)
    raise ValueError("no aggregate `cpu` line in /proc/stat")


def process_ticks_from_stat(text: str) -> int:
    """utime + stime of one process (all its threads), from /proc/<pid>/stat."""
    # The command name (field 2) is in parentheses and may contain spaces.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of the whole line


def minor_faults_from_stat(text: str) -> int:
    """Minor page faults of one process (all its threads), from /proc/<pid>/stat."""
    return int(text[text.rindex(")") + 2 :].split()[7])  # field 10 of the whole line


def minor_faults(pid: int | None = None) -> int | None:
    """Minor page faults so far of `pid` (default: this process); None if unknown."""
    text = _read(f"/proc/{pid or os.getpid()}/stat")
    return None if text is None else minor_faults_from_stat(text)


def cpu_model_from_cpuinfo(text: str) -> str:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class _Sample:
    at: float
    machine: MachineTicks
    per_pid: dict[int, int]

    @property
    def ours(self) -> int:
        return sum(self.per_pid.values())


class CpuMeter:
    """Cores kept busy by processes other than `pids` between `start()` and `stop()`;
    also how many cores sat idle or were stolen by the hypervisor meanwhile. Idle cores
    while a model computes on all of them mean its threads wait on each other (or on
    I/O); that is how the worker's throttled OpenMP barriers showed (processor.inference).
    """

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self.pids = {os.getpid(), *pids}
        self._start: _Sample | None = None
        self._end: _Sample | None = None

    def _per_pid(self) -> dict[int, int]:
        ticks = {}
        for pid in self.pids:
            text = _read(f"/proc/{pid}/stat")
            if text is not None:
                ticks[pid] = process_ticks_from_stat(text)
        return ticks

    def _sample(self) -> _Sample | None:
        text = _read("/proc/stat")
        if text is None:
            return None
        return _Sample(time.monotonic(), machine_ticks_from_proc_stat(text), self._per_pid())

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float | None:
        self._end = end = self._sample()
        if self._start is None or end is None or end.at <= self._start.at:
            return None
        busy = end.machine.busy - self._start.machine.busy
        others = busy - (end.ours - self._start.ours)
        return max(0.0, others / _TICKS / (end.at - self._start.at))

    def _machine_cores(self, ticks: Callable[[MachineTicks], int]) -> float | None:
        start, end = self._start, self._end
        if start is None or end is None or end.at <= start.at:
            return None
        return (ticks(end.machine) - ticks(start.machine)) / _TICKS / (end.at - start.at)

    def idle_cores(self) -> float | None:
        """Cores no thread wanted between `start()` and `stop()`, on average."""
        return self._machine_cores(lambda t: t.idle)

    def stolen_cores(self) -> float | None:
        """Cores the hypervisor gave to other guests while ours wanted them, on average."""
        return self._machine_cores(lambda t: t.stolen)

    def cores_of(self, pid: int) -> float | None:
        """Cores `pid` kept busy between `start()` and `stop()` on average."""
        start, end = self._start, self._end
        if start is None or end is None or pid not in start.per_pid or pid not in end.per_pid:
            return None
        return (end.per_pid[pid] - start.per_pid[pid]) / _TICKS / (end.at - start.at)


def wait_for_quiet(
    threshold: float,
    *,
    timeout_s: float,
    window_s: float = 3.0,
    pids: Iterable[int] = (),
    progress: Callable[[str], None] | None = None,
) -> float | None:
    """Wait until other processes use at most `threshold` cores over a `window_s` window,
    or `timeout_s` passed. Returns the last window's other load (None: cannot tell)."""
    deadline = time.monotonic() + timeout_s
    while True:
        meter = CpuMeter(pids)
        meter.start()
        time.sleep(window_s)
        other = meter.stop()
        if other is None or other <= threshold:
            return other
        if time.monotonic() >= deadline:
            if progress is not None:
                progress(f"still busy after {timeout_s:.0f} s ({other:.2f} cores); going on")
            return other


def machine_description(device: str) -> dict[str, str]:
    import torch
    import transformers

    cpuinfo = _read("/proc/cpuinfo") or ""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = f"{os.cpu_count()} logical" + (f", {affinity} usable" if affinity else "")
    description = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": cpu_model_from_cpuinfo(cpuinfo),
        "cores": cores,
        "device": device,
    }
    if device.startswith("cuda"):
        description["GPU"] = torch.cuda.get_device_name(device)
    # What decides the speeds here: the vector width, and bf16 in hardware or not.
    flags = [
        name
        for name, present in _cpu_capabilities().items()
        if present is True
        and ("bf16" in name or "amx" in name or name in ("avx2", "fma3", "avx512_f"))
    ]
    kernels = torch.backends.cpu.get_cpu_capability()
    description["CPU features"] = (
        ", ".join(sorted(flags)) or "unknown"
    ) + f" (torch kernels: {kernels})"
    description["software"] = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        description["load average at start"] = " ".join(f"{v:.2f}" for v in load)
    return description


def _cpu_capabilities() -> dict[str, object]:
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return {}
    try:
        return dict(get())
    except Exception:
        return {}
