"""Linear layers with their weights pre-packed for oneDNN (CPU: bf16, and fp32 decoding).

On a CPU, `torch.nn.functional.linear` in bf16 goes to oneDNN, which re-lays-out
("packs") the weight matrix for its kernel on every call. For the small matrices of the
token-by-token decoder (8-16 rows) that re-layout costs as much as the product itself.
`prepack_linears` does it once, at load: each `nn.Linear` becomes a `PackedLinear`
that calls oneDNN with the packed weight (the same kernel as before, so the same
results bit for bit: checked per layer at load time, and on captions by the tests).
Measured on the 2-core EPYC (AVX512-BF16), bf16, one call: 8x768 @ 768x768 70 -> 43 us,
8x768 @ 768x30524 (the LM head) 1.7 -> 1.0 ms, and 10-25% on the vision encoder's
4616-row products.

In fp32, `linear` goes to MKL's sgemm instead. On the 2-core AVX2 EPYC oneDNN's packed
kernel beat it where a product has a few rows, 1.45-2.2x per call (16x768 @ 768x768
273 -> 188 us; the LM head 18.5 -> 8.5 ms), and lost where it has thousands (9232 rows:
71 -> 79 ms). So in fp32 only the text decoder's per-token layers are packed: not the
vision encoder, not the cross-attention keys/values of the 577 image tokens. The kernel
sums in another order than MKL, so these results are the same to rounding, not to the
bit (checked per layer at load to 1e-5); the text decoder took 1.15-1.19x less time per
batch of 16 with the same token ids.

Packed only where `torch.ops.mkldnn` has the ops and this CPU runs them (oneDNN's bf16
reorder needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT); anything else (CUDA, fp16, bf16
forced on an AVX2 CPU, a torch without the ops) keeps plain `nn.Linear`.
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
def packing_supported(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether `dtype` weights can be packed here: the ops exist and this CPU runs them.

    On an AVX2-only CPU the bf16 reorder raises; a worker told to run bf16 there must
    still start (with plain weights), not crash while loading the model.
    """
    if not _ops_available():
        return False
    try:
        with torch.inference_mode():
            _reorder(torch.zeros(8, 8, dtype=dtype), _BATCH_HINT)
    except RuntimeError as exc:
        log.info("%s weights stay unpacked: oneDNN cannot pack them on this CPU (%s)", dtype, exc)
        return False
    return True


# fp32 layers that see every image token, not one token per caption: MKL is faster there.
_FP32_SKIPPED = ("crossattention.self.key", "crossattention.self.value")


def packing_applies(device: str, dtype: torch.dtype) -> bool:
    """Whether `prepack_linears` packs anything of a model on `device` in `dtype`."""
    return (
        device.startswith("cpu")
        and dtype in (torch.bfloat16, torch.float32)
        and packing_supported(dtype)
    )


def _packing_rule(path: str, weight: torch.Tensor) -> bool | None:
    """None: leave the layer alone; True: pack, the same bits; False: pack, the same to
    rounding (fp32, another summation order)."""
    if not packing_applies(weight.device.type, weight.dtype):
        return None
    if weight.dtype == torch.bfloat16:
        return True
    per_token = path.startswith("text_decoder.") and not path.endswith(_FP32_SKIPPED)
    return False if per_token else None


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
    """Replace the model's CPU `nn.Linear` layers that `_packing_rule` selects by
    `PackedLinear`s that give the same results (checked on a probe input per layer);
    returns how many were replaced."""
    replaced = 0
    generator = torch.Generator().manual_seed(0)
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            exact = _packing_rule(f"{path}.{name}" if path else name, child.weight)
            if exact is None:
                continue
            with torch.inference_mode():
                packed = PackedLinear(child)
                probe = torch.randn(
                    5, 3, child.in_features, generator=generator, dtype=torch.float32
                ).to(child.weight.dtype)
                if not all(
                    _same(packed(x), child(x), exact) for x in (probe, probe.transpose(0, 1))
                ):
                    log.info("not packing %s: results differ from nn.Linear", name)
                    continue
            setattr(parent, name, packed)
            replaced += 1
    return replaced


def _same(got: torch.Tensor, expected: torch.Tensor, exact: bool) -> bool:
    if exact:
        return torch.equal(got, expected)
    scale = float(expected.abs().max()) or 1.0
    return torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
