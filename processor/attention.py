"""BLIP's vision-encoder self-attention through `scaled_dot_product_attention`.

HF's BLIP attends eagerly (it refuses `attn_implementation="sdpa"`): every layer writes
a (batch x 12 x 577 x 577) score tensor, scales it, softmaxes it into another and reads
that back, 128 MiB each for 8 images in fp32. Where memory is slow that traffic, not the
arithmetic, is the cost: on the 2-core AVX2 EPYC, fp32, one layer's attention for 8
images took 370 ms eagerly and 83 ms fused, and the whole vision encoder 10.5-10.9 s
-> 6.2-7.2 s per batch of 8 (the same ids from the greedy loop). On the AVX512-BF16
EPYC in bf16 the fused kernel was slower (vision encoder 1.12x), so `auto` keeps
eager attention there.

`use_sdpa_vision_attention` swaps each layer's attention module for one that holds the
same `qkv` and `projection` layers (no copy of any weight) and runs the fused kernel.
The results are the same function of the weights, not the same bits.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class VisionAttention(StrEnum):
    AUTO = "auto"
    EAGER = "eager"
    SDPA = "sdpa"


def resolve_vision_attention(setting: str, device: str, dtype: torch.dtype) -> VisionAttention:
    """`auto`: fused everywhere except CPU bf16, where it measured slower (module doc)."""
    try:
        chosen = VisionAttention(setting.lower())
    except ValueError:
        choices = ", ".join(v.value for v in VisionAttention)
        raise ValueError(f"vision attention {setting!r}: expected one of {choices}") from None
    if chosen is not VisionAttention.AUTO:
        return chosen
    if device.startswith("cpu") and dtype == torch.bfloat16:
        return VisionAttention.EAGER
    return VisionAttention.SDPA


class SdpaBlipAttention(torch.nn.Module):
    """BLIP's `BlipAttention` (eval mode: no attention dropout) with a fused kernel."""

    def __init__(self, eager: Any) -> None:
        super().__init__()
        self.qkv: torch.nn.Module = eager.qkv
        self.projection: torch.nn.Module = eager.projection
        self.num_heads: int = eager.num_heads
        self.scale: float = eager.scale

    def forward(self, hidden_states: torch.Tensor, **_: Any) -> tuple[torch.Tensor, None]:
        batch, tokens, width = hidden_states.shape
        qkv = (
            self.qkv(hidden_states)
            .reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
            .permute(2, 0, 3, 1, 4)  # (3, batch, heads, tokens, head width)
        )
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        out: torch.Tensor = self.projection(attended.transpose(1, 2).reshape(batch, tokens, width))
        return out, None  # no attention weights: the fused kernel never makes them


def use_sdpa_vision_attention(model: Any) -> int:
    """Swap the vision encoder's attention modules of a BLIP model; returns how many."""
    layers = getattr(getattr(getattr(model, "vision_model", None), "encoder", None), "layers", [])
    swapped = 0
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if attention is None or isinstance(attention, SdpaBlipAttention):
            continue
        if not all(hasattr(attention, a) for a in ("qkv", "projection", "num_heads", "scale")):
            log.info("vision attention left eager: %s is not BLIP's", type(attention).__name__)
            return swapped
        layer.self_attn = SdpaBlipAttention(attention)
        swapped += 1
    return swapped
