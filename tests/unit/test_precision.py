"""Precision resolution (`CAPTIONSTREAM_PRECISION`) and the tiny BLIP in reduced precision."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from captionstream.errors import ConfigurationError
from captionstream.processor.captioner import BlipCaptioner
from captionstream.processor.precision import (
    Precision,
    bf16_from_capabilities,
    bf16_from_cpuinfo,
    cpu_has_native_bf16,
    resolve_precision,
)
from captionstream.processor.tiny_blip import TINY_BLIP
from captionstream.schemas.events import GenerationOptions
from captionstream.settings import ProcessorSettings


@pytest.mark.parametrize(
    ("device", "cpu_has_bf16", "expected"),
    [
        ("cuda", False, Precision.FP16),
        ("cuda", True, Precision.FP16),
        ("cuda:1", False, Precision.FP16),
        ("cpu", True, Precision.BF16),
        ("cpu", False, Precision.FP32),
        ("mps", True, Precision.FP32),  # neither CUDA nor CPU: the safe default
    ],
)
def test_auto(device: str, cpu_has_bf16: bool, expected: Precision) -> None:
    assert resolve_precision("auto", device, cpu_has_bf16=cpu_has_bf16) is expected


@pytest.mark.parametrize("setting", ["fp32", "bf16", "fp16", " BF16 ", "FP32"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("cpu_has_bf16", [True, False])
def test_explicit_values_are_honoured(setting: str, device: str, cpu_has_bf16: bool) -> None:
    chosen = resolve_precision(setting, device, cpu_has_bf16=cpu_has_bf16)
    assert chosen is Precision(setting.strip().lower())


@pytest.mark.parametrize("setting", ["", "fp8", "float32", "half", "int8"])
def test_invalid_value_names_the_setting(setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_precision(setting, "cpu", cpu_has_bf16=True)
    message = str(info.value)
    assert "CAPTIONSTREAM_PRECISION" in message
    assert repr(setting) in message
    for choice in ("auto", "fp32", "bf16", "fp16"):
        assert choice in message


def test_dtypes() -> None:
    assert Precision.FP32.dtype is torch.float32
    assert Precision.BF16.dtype is torch.bfloat16
    assert Precision.FP16.dtype is torch.float16


def test_settings_default_is_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTIONSTREAM_PRECISION", raising=False)
    assert ProcessorSettings().precision == "auto"


def test_bf16_from_capabilities() -> None:
    assert bf16_from_capabilities({"avx512_bf16": True, "amx_bf16": False})
    assert bf16_from_capabilities({"avx512_bf16": False, "amx_bf16": True})
    assert bf16_from_capabilities({"bf16": True, "architecture": "arm64"})
    assert not bf16_from_capabilities({"avx512_bf16": False, "avx2": True})
    assert not bf16_from_capabilities({})


def test_bf16_from_cpuinfo() -> None:
    x86 = ["processor\t: 0\n", "flags\t\t: fpu sse2 avx512f avx512_bf16 avx2\n"]
    assert bf16_from_cpuinfo(x86)
    assert bf16_from_cpuinfo(["flags : fpu amx_bf16 amx_tile\n"])
    assert bf16_from_cpuinfo(["Features\t: fp asimd bf16 i8mm\n"])  # arm64
    assert not bf16_from_cpuinfo(["flags\t\t: fpu sse2 avx512f avx2\n"])
    assert not bf16_from_cpuinfo(["flags : avx512_bf16x\n"])  # whole flags only
    assert not bf16_from_cpuinfo([])


def test_cpu_detection_falls_back_to_cpuinfo_then_to_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2\n")
    assert not cpu_has_native_bf16(cpuinfo)
    assert not cpu_has_native_bf16(tmp_path / "missing")  # unknown: fp32


def test_load_rejects_invalid_precision_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="CAPTIONSTREAM_PRECISION"):
        BlipCaptioner.load(TINY_BLIP, data_dir=tmp_path, device="cpu", precision="fp8")
    assert not (tmp_path / "models").exists()  # failed before building/loading anything


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_tiny_blip_captions_in_precision(
    precision: str, dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    captioner = BlipCaptioner.load(TINY_BLIP, data_dir=tmp_path, device="cpu", precision=precision)
    assert captioner.model.dtype == dtype
    assert all(p.dtype == dtype for p in captioner.model.parameters())
    images = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (20, 90), "blue")]
    options = [GenerationOptions(max_new_tokens=6), GenerationOptions(prompt="a picture of")]
    captions = captioner.caption(images, options)
    assert len(captions) == 2
    assert all(isinstance(c, str) for c in captions)
    assert len(captions[0].split()) <= 6
    assert captions[1].startswith("a picture of")
