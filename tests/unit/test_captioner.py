"""The real BLIP captioner on the tiny random model (offline, CPU, a few seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from captionstream.errors import ConfigurationError, ModelLoadError
from captionstream.processor.captioner import (
    BlipCaptioner,
    GenerationDefaults,
    input_size_of,
    resolve_model_source,
)
from captionstream.processor.tiny_blip import TINY_BLIP
from captionstream.schemas.events import GenerationOptions
from tests.helpers.model import go_offline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def captioner(data_dir: Path) -> Iterator[BlipCaptioner]:
    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp)
        yield BlipCaptioner.load(TINY_BLIP, data_dir=data_dir, device="cpu")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch)


def images() -> list[Image.Image]:
    return [
        Image.new("RGB", (64, 48), "red"),
        Image.new("RGB", (20, 90), "blue"),
        Image.new("RGB", (33, 33), "white"),
    ]


def test_load_tiny_blip(captioner: BlipCaptioner, data_dir: Path) -> None:
    assert captioner.name == TINY_BLIP
    assert captioner.device == "cpu"
    assert captioner.defaults == GenerationDefaults()
    assert not captioner.model.training  # eval mode
    assert (data_dir / "models" / TINY_BLIP / "config.json").is_file()


def test_input_size_is_the_models_image_size(captioner: BlipCaptioner) -> None:
    size = captioner.processor.image_processor.size
    assert captioner.input_size == (size.width, size.height)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ({"height": 384, "width": 320}, (320, 384)),
        ({"shortest_edge": 224}, (224, 224)),
        ({"longest_edge": 1000}, None),
        (None, None),
    ],
)
def test_input_size_of_image_processor_sizes(
    size: dict[str, int] | None, expected: tuple[int, int] | None
) -> None:
    class Processor:
        pass

    processor = Processor()
    processor.size = size  # type: ignore[attr-defined]
    assert input_size_of(processor) == expected


def test_caption_mixed_options(captioner: BlipCaptioner) -> None:
    options = [
        GenerationOptions(prompt="a picture of"),
        GenerationOptions(max_new_tokens=5),
        GenerationOptions(),
    ]
    captions = captioner.caption(images(), options)
    assert len(captions) == 3
    assert all(isinstance(c, str) for c in captions)
    assert all(c == c.strip() for c in captions)
    assert "[SEP]" not in " ".join(captions)  # special tokens are stripped
    # conditional captioning continues the prompt
    assert captions[0].startswith("a picture of")
    # every word of the tiny vocabulary is one token
    assert len(captions[1].split()) <= 5


def test_captions_are_deterministic_and_independent_of_batching(
    captioner: BlipCaptioner,
) -> None:
    opts = [GenerationOptions(max_new_tokens=8)] * 3
    batched = captioner.caption(images(), opts)
    one_by_one = [
        captioner.caption([img], [opt])[0] for img, opt in zip(images(), opts, strict=True)
    ]
    assert batched == one_by_one
    assert captioner.caption(images(), opts) == batched


def test_caption_with_beams(captioner: BlipCaptioner) -> None:
    [text] = captioner.caption([images()[0]], [GenerationOptions(num_beams=2, max_new_tokens=4)])
    assert isinstance(text, str)
    assert len(text.split()) <= 4


def test_caption_empty_batch(captioner: BlipCaptioner) -> None:
    assert captioner.caption([], []) == []


def test_caption_requires_one_option_per_image(captioner: BlipCaptioner) -> None:
    with pytest.raises(ValueError, match="one GenerationOptions per image"):
        captioner.caption(images(), [GenerationOptions()])


def test_building_tiny_blip_twice_reuses_the_directory(
    captioner: BlipCaptioner, data_dir: Path, offline: None
) -> None:
    target = data_dir / "models" / TINY_BLIP
    config = target / "config.json"
    before = config.stat().st_mtime_ns
    assert resolve_model_source(TINY_BLIP, data_dir) == str(target)
    again = BlipCaptioner.load(TINY_BLIP, data_dir=data_dir, device="cpu")
    assert config.stat().st_mtime_ns == before
    assert [p.name for p in (data_dir / "models").iterdir()] == [TINY_BLIP]  # no temp dirs
    # same weights, same captions
    opts = [GenerationOptions(max_new_tokens=6)]
    assert again.caption(images()[:1], opts) == captioner.caption(images()[:1], opts)


def test_non_tiny_model_source_is_passed_through(tmp_path: Path) -> None:
    assert resolve_model_source("Salesforce/blip", tmp_path) == "Salesforce/blip"
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    "model", ["/nonexistent/model/dir", "someone-nonexistent/not-a-real-blip-model"]
)
def test_unloadable_model_raises_model_load_error(
    model: str, tmp_path: Path, offline: None
) -> None:
    with pytest.raises(ModelLoadError) as info:
        BlipCaptioner.load(model, data_dir=tmp_path, device="cpu")
    message = str(info.value)
    assert "CAPTIONSTREAM_MODEL" in message
    assert model in message
    assert "HF_HUB_OFFLINE is set" in message
    assert isinstance(info.value, ConfigurationError)


def test_local_directory_without_a_model_raises_model_load_error(
    tmp_path: Path, offline: None
) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="CAPTIONSTREAM_MODEL"):
        BlipCaptioner.load(str(empty), data_dir=tmp_path, device="cpu")
