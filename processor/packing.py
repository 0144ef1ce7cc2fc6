"""Linear layers with their weights pre-packed for oneDNN (CPU, bf16).

On a CPU, `torch.nn.functional.linear` in bf16 goes to oneDNN, which re-lays-out
("packs") the weight matrix for its kernel on every call. For the small matrices of the
token-by-token decoder (8-16 rows) that re-layout costs as much as the product itself.
`prepack_linears` does it once, at load: each `nn.Linear` becomes a `PackedLinear`
that calls oneDNN with the packed weight (the same kernel as before, so the same
results bit for bit: checked per layer at load time, and on captions by the tests).

Measured on the 2-core EPYC (AVX512-BF16), bf16, one call: 8x768 @ 768x768 70 -> 43 us,
8x768 @ 768x30524 (the LM head) 1.7 -> 1.0 ms, and 10-25% on the vision encoder's
4616-row products.

Only CPU bf16 weights are packed, only where `torch.ops.mkldnn` has the ops and this CPU
runs them (oneDNN's bf16 reorder needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT); anything
else (CUDA, fp32, fp16, bf16 forced on an AVX2 CPU, a torch without the ops) keeps
plain `nn.Linear`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# The row count oneDNN is told to expect (a hint: any count works).
_BATCH_HINT = 16


def _ops_available() -> bool:
    try:
        mkldnn: Any = torch.ops.mkldnn
        return (
            torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight")
        )
    except (AttributeError, RuntimeError):
        return False


def _reorder(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    mkldnn: Any = torch.ops.mkldnn
    packed: torch.Tensor = mkldnn._reorder_linear_weight(weight, batch_hint)
    return packed


@functools.cache
def packing_supported() -> bool:
    """Whether bf16 weights can be packed here: the ops exist and this CPU runs them.

    On an AVX2-only CPU the reorder raises; a worker told to run bf16 there must still
    start (with plain weights), not crash while loading the model.
    """
    if not _ops_available():
        return False
    try:
        with torch.inference_mode():
            _reorder(torch.zeros(8, 8, dtype=torch.bfloat16), _BATCH_HINT)
    except RuntimeError as exc:
        log.info("bf16 weights stay unpacked: oneDNN cannot pack them on this CPU (%s)", exc)
        return False
    return True


class PackedLinear(torch.nn.Module):
    """`nn.Linear` with the weight packed once (the plain weight is let go: no extra
    memory). A strided input, where oneDNN's result can differ from `nn.Linear`'s,
    takes the plain path with the weight unpacked for that call (BLIP: only the LM
    head's first step after a prompt)."""

    packed: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, batch_hint: int = _BATCH_HINT) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", _reorder(weight, batch_hint))
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            return torch.nn.functional.linear(x, self.packed.to_dense(), self.bias)
        mkldnn: Any = torch.ops.mkldnn
        out: torch.Tensor = mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def prepack_linears(model: torch.nn.Module) -> int:
    """Replace the model's CPU bf16 `nn.Linear` layers by `PackedLinear`s that give the
    same results (checked on a probe input per layer); returns how many were replaced."""
    if not packing_supported():
        return 0
    replaced = 0
    generator = torch.Generator().manual_seed(0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or isinstance(child, PackedLinear):
                continue
            weight = child.weight
            if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
                continue
            with torch.inference_mode():
                packed = PackedLinear(child)
                probe = torch.randn(
                    5, 3, child.in_features, generator=generator, dtype=torch.float32
                ).to(torch.bfloat16)
                strided = probe.transpose(0, 1)
                if not (
                    torch.equal(packed(probe), child(probe))
                    and torch.equal(packed(strided), child(strided))
                ):
                    log.info("not packing %s: results differ from nn.Linear", name)
                    continue
            setattr(parent, name, packed)
            replaced += 1
    return replaced
