"""oneDNN-packed linear weights (`processor.packing`): same results as `nn.Linear`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from captionstream.processor import packing
from captionstream.processor.captioner import BlipCaptioner
from captionstream.processor.greedy import lean_greedy
from captionstream.processor.packing import PackedLinear, packing_supported, prepack_linears
from captionstream.schemas.events import GenerationOptions
from tests.helpers.model import load_tiny_blip

needs_ops = pytest.mark.skipif(
    not packing_supported(),
    reason="oneDNN cannot pack bf16 weights here (no ops, or a CPU without AVX-512)",
)


def net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False)
    ).to(dtype)


@needs_ops
def test_bf16_linears_are_packed_and_give_the_same_results() -> None:
    plain = net(torch.bfloat16)
    packed = net(torch.bfloat16)
    assert prepack_linears(packed) == 2
    assert all(isinstance(packed[i], PackedLinear) for i in (0, 2))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())  # let go
    x = torch.randn(6, 4, 16).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
        strided = x.transpose(0, 1)  # the plain path, same result
        assert torch.equal(packed(strided), plain(strided))
    assert prepack_linears(packed) == 0  # idempotent


def test_other_dtypes_are_left_alone() -> None:
    for dtype in (torch.float32, torch.float16):
        model = net(dtype)
        assert prepack_linears(model) == 0
        assert isinstance(model[0], torch.nn.Linear)


def test_nothing_is_packed_without_the_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("captionstream.processor.packing.packing_supported", lambda *_: False)
    assert prepack_linears(net(torch.bfloat16)) == 0


def test_a_cpu_that_cannot_pack_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """What oneDNN raises on an AVX2 CPU: packing is off, it does not crash the load."""

    def refuse(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")

    monkeypatch.setattr(packing, "_ops_available", lambda: True)
    monkeypatch.setattr(packing, "_reorder", refuse)
    assert packing.packing_supported.__wrapped__() is False


@pytest.fixture(scope="module")
def captioners(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, BlipCaptioner]:
    data = tmp_path_factory.getbasetemp() / "packing-data"
    return {
        packed: load_tiny_blip(data, precision="bf16", prepack_weights=packed)
        for packed in (False, True)
    }


@needs_ops
def test_packed_blip_gives_generates_token_ids(captioners: dict[bool, BlipCaptioner]) -> None:
    plain: Any = captioners[False].model
    packed: Any = captioners[True].model
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    images = [Image.new("RGB", (40 + 9 * i, 30), c) for i, c in enumerate(["red", "blue", "gray"])]
    processor = captioners[False].processor
    for prompt in (None, "a picture of"):
        inputs = processor(
            images=images, text=[prompt] * 3 if prompt else None, return_tensors="pt"
        )
        pixels = inputs["pixel_values"].to(torch.bfloat16)
        ids = inputs.get("input_ids")
        with torch.inference_mode():
            expected = plain.generate(
                pixel_values=pixels,
                input_ids=None if ids is None else ids.clone(),
                attention_mask=inputs.get("attention_mask"),
                max_new_tokens=12,
            )
            assert torch.equal(lean_greedy(packed, pixels, ids, 12), expected)
    options = [GenerationOptions(max_new_tokens=12), GenerationOptions(num_beams=2)]
    assert captioners[True].caption(images[:2], options) == captioners[False].caption(
        images[:2], options
    )


def test_worker_settings_reach_the_captioner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from captionstream.processor import worker
    from captionstream.settings import ProcessorSettings

    seen: dict[str, Any] = {}
    monkeypatch.setattr(BlipCaptioner, "load", lambda model, **kw: seen.update(kw))
    monkeypatch.setenv("CAPTIONSTREAM_LEAN_DECODER", "false")
    monkeypatch.setenv("CAPTIONSTREAM_PREPACK_WEIGHTS", "false")
    worker.load_captioner(ProcessorSettings(data_dir=tmp_path))
    assert seen["lean_decoder"] is False
    assert seen["prepack_weights"] is False
    monkeypatch.delenv("CAPTIONSTREAM_LEAN_DECODER")
    monkeypatch.delenv("CAPTIONSTREAM_PREPACK_WEIGHTS")
    worker.load_captioner(ProcessorSettings(data_dir=tmp_path))
    assert seen["lean_decoder"] is True
    assert seen["prepack_weights"] is True


@pytest.mark.parametrize(
    ("path", "dtype", "expected"),
    [
        ("vision_model.encoder.layers.0.mlp.fc1", torch.bfloat16, True),
        ("text_decoder.cls.predictions.decoder", torch.bfloat16, True),
        ("text_decoder.cls.predictions.decoder", torch.float32, False),  # the LM head
        ("text_decoder.bert.encoder.layer.3.attention.self.query", torch.float32, False),
        ("text_decoder.bert.encoder.layer.3.crossattention.self.query", torch.float32, False),
        ("text_decoder.bert.encoder.layer.3.crossattention.self.key", torch.float32, None),
        ("text_decoder.bert.encoder.layer.3.crossattention.self.value", torch.float32, None),
        ("vision_model.encoder.layers.0.mlp.fc1", torch.float32, None),
        ("text_decoder.cls.predictions.decoder", torch.float16, None),
    ],
)
def test_which_layers_are_packed(
    monkeypatch: pytest.MonkeyPatch, path: str, dtype: torch.dtype, expected: bool | None
) -> None:
    """bf16: every layer, bit for bit. fp32: only products of a few rows (one token per
    caption), where oneDNN beats MKL; the same to rounding."""
    monkeypatch.setattr(packing, "packing_supported", lambda *_: True)
    assert packing._packing_rule(path, torch.empty(2, 2, dtype=dtype)) is expected


@pytest.mark.skipif(
    not packing_supported(torch.float32), reason="oneDNN cannot pack fp32 weights here"
)
def test_fp32_blip_packs_its_decoder_and_keeps_its_captions(tmp_path: Path) -> None:
    plain, packed = (
        load_tiny_blip(tmp_path, precision="fp32", prepack_weights=p) for p in (False, True)
    )
    model: Any = packed.model
    packed_paths = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert "text_decoder.cls.predictions.decoder" in packed_paths
    assert all(p.startswith("text_decoder.") for p in packed_paths)
    assert not any(
        p.endswith(("crossattention.self.key", "crossattention.self.value")) for p in packed_paths
    )
    images = [Image.new("RGB", (40 + 9 * i, 30), c) for i, c in enumerate(["red", "blue", "gray"])]
    for prompt in (None, "a picture of"):
        inputs = plain.processor(
            images=images, text=[prompt] * 3 if prompt else None, return_tensors="pt"
        )
        ids = inputs.get("input_ids")
        with torch.inference_mode():
            expected = plain.model.generate(
                pixel_values=inputs["pixel_values"],
                input_ids=None if ids is None else ids.clone(),
                attention_mask=inputs.get("attention_mask"),
                max_new_tokens=12,
            )
            assert torch.equal(lean_greedy(model, inputs["pixel_values"], ids, 12), expected)
    options = [GenerationOptions(max_new_tokens=12), GenerationOptions(num_beams=2)]
    assert packed.caption(images[:2], options) == plain.caption(images[:2], options)
