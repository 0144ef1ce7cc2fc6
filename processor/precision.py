"""Which floating-point precision the model runs in (`CAPTIONSTREAM_PRECISION`).

`auto` picks fp16 on CUDA, bf16 on CPUs with native bf16 instructions (AVX512-BF16 or
AMX-BF16 on x86, the BF16 extension on Arm), and fp32 everywhere else, including when
CPU support cannot be determined. An explicit fp32 / bf16 / fp16 is always honoured.

`resolve_precision` is a pure function of its arguments; `cpu_has_native_bf16` is the
only part that looks at the machine.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captionstream.errors import ConfigurationError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AUTO = "auto"

# CPU feature names that mean "bf16 arithmetic in hardware": torch.cpu.get_capabilities()
# keys and /proc/cpuinfo flags (x86 and arm64 spellings).
_BF16_CAPABILITIES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
_BF16_CPUINFO_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


class Precision(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return {
            Precision.FP32: torch.float32,
            Precision.BF16: torch.bfloat16,
            Precision.FP16: torch.float16,
        }[self]


def resolve_precision(setting: str, device: str, *, cpu_has_bf16: bool) -> Precision:
    """Map the precision setting and the (already selected) device to a `Precision`.

    `cpu_has_bf16` is whether this CPU computes bf16 natively (see `cpu_has_native_bf16`);
    it only matters for `auto` on a CPU device.
    """
    value = setting.strip().lower()
    if value == AUTO:
        kind = device.split(":", 1)[0]
        if kind == "cuda":
            return Precision.FP16
        if kind == "cpu" and cpu_has_bf16:
            return Precision.BF16
        return Precision.FP32
    try:
        return Precision(value)
    except ValueError:
        choices = " | ".join([AUTO, *Precision])
        raise ConfigurationError(
            f"invalid precision {setting!r}: set CAPTIONSTREAM_PRECISION to one of {choices}"
        ) from None


def bf16_from_capabilities(capabilities: Mapping[str, Any]) -> bool:
    """Native bf16 according to a `torch.cpu.get_capabilities()` mapping."""
    return any(capabilities.get(name) is True for name in _BF16_CAPABILITIES)


def bf16_from_cpuinfo(lines: Iterable[str]) -> bool:
    """Native bf16 according to the `flags` (x86) / `Features` (arm64) lines of cpuinfo."""
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return not _BF16_CPUINFO_FLAGS.isdisjoint(value.split())
    return False


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 instructions; False when it cannot be told."""
    try:
        import torch

        get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # recent torch only
        if get_capabilities is not None:
            return bf16_from_capabilities(get_capabilities())
    except Exception:  # an odd platform must not stop the worker: fall through
        log.debug("torch.cpu.get_capabilities() failed", exc_info=True)
    try:
        with cpuinfo.open() as lines:
            return bf16_from_cpuinfo(lines)
    except OSError:
        return False
