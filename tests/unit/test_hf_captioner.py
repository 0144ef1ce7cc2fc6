"""The generic image-to-text captioner on a tiny vision-encoder-decoder built here
(ViT encoder + BERT decoder, random weights), loaded through `from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from captionstream.errors import ConfigurationError, ModelLoadError
from captionstream.processor.captioner import GenerationDefaults, caption_in_groups
from captionstream.processor.hf_captioner import HFImageToTextCaptioner
from captionstream.processor.worker import load_captioner
from captionstream.schemas.events import GenerationOptions
from captionstream.settings import ProcessorSettings

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *["a", "cat", "dog", "on", "the", "mat", "red", "sky"],
]


@pytest.fixture(scope="module")
def tiny_ved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    target = tmp_path_factory.mktemp("tiny-ved")
    vocab = {w: i for i, w in enumerate(WORDS)}
    tokenizer = BertTokenizer(vocab=vocab)
    encoder = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    decoder = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        is_decoder=True,
        add_cross_attention=True,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = vocab["[CLS]"]
    config.pad_token_id = vocab["[PAD]"]
    config.eos_token_id = vocab["[SEP]"]
    torch.manual_seed(0)
    VisionEncoderDecoderModel(config=config).save_pretrained(target)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def images() -> list[Image.Image]:
    return [Image.new("RGB", (40 + i, 30), (i * 60, 20, 200)) for i in range(3)]


def test_captions_one_per_image_with_mixed_options(tiny_ved: Path, tmp_path: Path) -> None:
    captioner = HFImageToTextCaptioner.load(str(tiny_ved), data_dir=tmp_path, device="cpu")
    assert captioner.encoder_decoder
    options = [
        GenerationOptions(),
        GenerationOptions(max_new_tokens=3),
        GenerationOptions(prompt="a cat"),
    ]
    captions = captioner.caption(images(), options)
    assert len(captions) == 3
    assert all(isinstance(c, str) for c in captions)
    assert len(captions[1].split()) <= 3
    assert captions[2].startswith("a cat"), "the prompt is the caption's prefix"


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", "float32"), ("bf16", "bfloat16")])
def test_loads_in_the_chosen_precision(
    tiny_ved: Path, tmp_path: Path, precision: str, dtype: str
) -> None:
    """CAPTIONSTREAM_PRECISION applies to the generic captioner as to BLIP (bf16 runs on
    any CPU through torch's emulation; `auto` picks it only where the CPU has it)."""
    captioner = HFImageToTextCaptioner.load(
        str(tiny_ved), data_dir=tmp_path, device="cpu", precision=precision
    )
    assert str(captioner.model.dtype) == f"torch.{dtype}"
    captions = captioner.caption(images(), [GenerationOptions(max_new_tokens=4)] * 3)
    assert len(captions) == 3
    assert all(isinstance(c, str) for c in captions)


def test_a_bad_precision_fails_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="CAPTIONSTREAM_PRECISION"):
        HFImageToTextCaptioner.load(
            str(tmp_path / "nothing"), data_dir=tmp_path, device="cpu", precision="int3"
        )


def test_selected_by_configuration(
    tiny_ved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_CAPTIONER", "hf-image-to-text")
    monkeypatch.setenv("CAPTIONSTREAM_MODEL", str(tiny_ved))
    monkeypatch.setenv("CAPTIONSTREAM_DATA_DIR", str(tmp_path))
    captioner = load_captioner(ProcessorSettings())
    assert isinstance(captioner, HFImageToTextCaptioner)
    assert len(captioner.caption(images()[:2], [GenerationOptions()] * 2)) == 2


def test_unknown_model_fails_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="CAPTIONSTREAM_MODEL"):
        HFImageToTextCaptioner.load(str(tmp_path / "nothing"), data_dir=tmp_path, device="cpu")


def test_caption_in_groups_restores_input_order() -> None:
    calls = []

    def generate(batch: list[Image.Image], key: tuple[int, int, str | None]) -> list[str]:
        calls.append((len(batch), key))
        return [f"{key[2]}:{img.width}" for img in batch]

    imgs = images()
    options = [GenerationOptions(prompt="x"), GenerationOptions(), GenerationOptions(prompt="x")]
    out = caption_in_groups(imgs, options, GenerationDefaults(7, 2), generate)
    assert out == ["x:40", "None:41", "x:42"]
    assert sorted(calls, key=str) == sorted([(2, (7, 2, "x")), (1, (7, 2, None))], key=str)
