"""Fused vision attention (`processor.attention`): the same function as BLIP's own."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from captionstream.processor.attention import (
    SdpaBlipAttention,
    VisionAttention,
    resolve_vision_attention,
    use_sdpa_vision_attention,
)
from captionstream.processor.captioner import BlipCaptioner
from captionstream.schemas.events import GenerationOptions
from tests.helpers.model import load_tiny_blip


@pytest.mark.parametrize(
    ("setting", "device", "dtype", "expected"),
    [
        ("auto", "cpu", torch.float32, VisionAttention.SDPA),
        ("auto", "cpu", torch.bfloat16, VisionAttention.EAGER),  # measured slower there
        ("auto", "cuda:0", torch.float16, VisionAttention.SDPA),
        ("auto", "cuda", torch.bfloat16, VisionAttention.SDPA),
        ("eager", "cpu", torch.float32, VisionAttention.EAGER),
        ("SDPA", "cpu", torch.bfloat16, VisionAttention.SDPA),  # an explicit choice wins
    ],
)
def test_resolve_vision_attention(
    setting: str, device: str, dtype: torch.dtype, expected: VisionAttention
) -> None:
    assert resolve_vision_attention(setting, device, dtype) is expected


def test_a_bad_setting_names_the_choices() -> None:
    with pytest.raises(ValueError, match="expected one of auto, eager, sdpa"):
        resolve_vision_attention("flash", "cpu", torch.float32)


@pytest.fixture(scope="module")
def captioners(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BlipCaptioner]:
    data = tmp_path_factory.getbasetemp() / "attention-data"
    return {
        attention: load_tiny_blip(
            data,
            precision="fp32",
            vision_attention=attention,
            prepack_weights=False,  # packed weights cannot be deep-copied
        )
        for attention in ("eager", "sdpa")
    }


def images() -> list[Image.Image]:
    return [
        Image.radial_gradient("L").convert("RGB").resize((50 + 7 * i, 40))
        if i % 2
        else Image.new("RGB", (30 + 11 * i, 60), (40 * i, 200 - 30 * i, 90))
        for i in range(5)
    ]


def with_real_scale_weights(model: Any) -> Any:
    """A copy whose vision linears have trained-model magnitudes: BLIP's random init
    draws them with std 1e-10, too small for a comparison to show anything."""
    real = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in real.vision_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.05, generator=generator)
                module.bias.normal_(0, 0.05, generator=generator)
    return real


def test_fused_attention_computes_what_blip_does(captioners: dict[str, BlipCaptioner]) -> None:
    assert all(
        isinstance(layer.self_attn, SdpaBlipAttention)
        for layer in captioners["sdpa"].model.vision_model.encoder.layers
    )
    assert not any(isinstance(m, SdpaBlipAttention) for m in captioners["eager"].model.modules())

    eager = with_real_scale_weights(captioners["eager"].model)
    fused = copy.deepcopy(eager)
    assert use_sdpa_vision_attention(fused) == len(eager.vision_model.encoder.layers)
    processor = captioners["eager"].processor
    pixels = processor(images=images(), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = eager.vision_model(pixel_values=pixels)[0]
        got = fused.vision_model(pixel_values=pixels)[0]
        assert expected.std() > 0.1  # a real signal, not zeros against zeros
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        for eager_layer, fused_layer in zip(
            eager.vision_model.encoder.layers, fused.vision_model.encoder.layers, strict=True
        ):
            x = torch.randn(3, 17, eager.config.vision_config.hidden_size)
            want, _ = eager_layer.self_attn(hidden_states=x)
            have, weights = fused_layer.self_attn(hidden_states=x)
            assert weights is None
            assert want.std() > 0.01
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)

    def captioner(model: Any) -> BlipCaptioner:
        return BlipCaptioner(model, processor, "cpu", "tiny", captioners["eager"].defaults)

    options = [GenerationOptions(max_new_tokens=10)] * 5
    assert captioner(fused).caption(images(), options) == captioner(eager).caption(
        images(), options
    )


def test_the_swap_reuses_the_weights_and_runs_once(captioners: dict[str, BlipCaptioner]) -> None:
    model: Any = copy.deepcopy(captioners["eager"].model)
    layers = model.vision_model.encoder.layers
    before = [(layer.self_attn.qkv, layer.self_attn.projection) for layer in layers]
    assert use_sdpa_vision_attention(model) == len(layers) > 0
    assert [(layer.self_attn.qkv, layer.self_attn.projection) for layer in layers] == before
    assert use_sdpa_vision_attention(model) == 0
    assert use_sdpa_vision_attention(torch.nn.Linear(2, 2)) == 0  # not BLIP: left alone


def test_worker_setting_reaches_the_captioner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from captionstream.processor import worker
    from captionstream.settings import ProcessorSettings

    seen: dict[str, Any] = {}
    monkeypatch.setattr(BlipCaptioner, "load", lambda model, **kw: seen.update(kw))
    worker.load_captioner(ProcessorSettings(data_dir=tmp_path))
    assert seen["vision_attention"] == "auto"
    monkeypatch.setenv("CAPTIONSTREAM_VISION_ATTENTION", "eager")
    worker.load_captioner(ProcessorSettings(data_dir=tmp_path))
    assert seen["vision_attention"] == "eager"
