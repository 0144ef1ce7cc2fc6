"""The lean greedy loop gives exactly `model.generate()`'s token ids (tiny random BLIP)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from captionstream.processor.captioner import BlipCaptioner
from captionstream.processor.greedy import lean_greedy, lean_greedy_supported
from captionstream.processor.tiny_blip import TINY_BLIP
from captionstream.schemas.events import GenerationOptions


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def captioner(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BlipCaptioner]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield BlipCaptioner.load(
            TINY_BLIP,
            data_dir=tmp_path_factory.getbasetemp() / "greedy-data",
            device="cpu",
            precision=request.param,
        )


def images(n: int = 5) -> list[Image.Image]:
    colours = ["red", "blue", "white", "green", "black", "yellow", "purple"]
    sizes = [(64, 48), (20, 90), (33, 33), (128, 16), (40, 40)]
    return [Image.new("RGB", sizes[i % len(sizes)], colours[i % len(colours)]) for i in range(n)]


def both(
    captioner: BlipCaptioner, n_images: int, max_new_tokens: int, prompt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    model: Any = captioner.model
    text = [prompt] * n_images if prompt else None
    inputs = captioner.processor(images=images(n_images), text=text, return_tensors="pt")
    pixels = inputs["pixel_values"].to(model.dtype)
    ids = inputs.get("input_ids")
    with torch.inference_mode():
        expected = model.generate(
            pixel_values=pixels,
            input_ids=None if ids is None else ids.clone(),
            attention_mask=inputs.get("attention_mask"),
            max_new_tokens=max_new_tokens,
        )
        got = lean_greedy(model, pixels, ids, max_new_tokens)
    return expected, got


@pytest.mark.parametrize("n_images", [1, 5])
@pytest.mark.parametrize("max_new_tokens", [1, 7, 30])
def test_same_token_ids_as_generate(
    captioner: BlipCaptioner, n_images: int, max_new_tokens: int
) -> None:
    assert lean_greedy_supported(captioner.model, num_beams=1)
    expected, got = both(captioner, n_images, max_new_tokens)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_same_token_ids_as_generate_with_a_prompt(captioner: BlipCaptioner) -> None:
    expected, got = both(captioner, 3, 6, prompt="a picture of")
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_rows_that_end_early_are_padded_and_the_loop_stops_when_all_end(
    captioner: BlipCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make a token the model does produce the end-of-caption token: some rows end early
    (then pad), and the loop stops before max_new_tokens once every row has ended."""
    model: Any = captioner.model
    expected, _ = both(captioner, 5, 12)
    first = expected[:, 1]  # the first generated token of each row
    monkeypatch.setattr(model.config.text_config, "sep_token_id", int(first[0]))
    expected, got = both(captioner, 5, 12)
    assert torch.equal(got, expected)
    pad = model.config.text_config.pad_token_id
    assert int(got[0, 1]) == int(first[0])  # row 0 ended at its first token ...
    assert bool((got[0, 2:] == pad).all())  # ... and is padded from there on
    if bool((first == first[0]).all()):
        assert got.shape[1] == 2  # every row ended: no further steps


def test_min_new_tokens_is_honoured(
    captioner: BlipCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    model: Any = captioner.model
    expected, _ = both(captioner, 5, 12)
    monkeypatch.setattr(model.config.text_config, "sep_token_id", int(expected[0, 1]))
    monkeypatch.setattr(model.text_decoder.generation_config, "min_new_tokens", 4)
    expected, got = both(captioner, 5, 12)
    assert torch.equal(got, expected)
    assert got.shape[1] >= 5


def test_beams_sampling_and_other_processors_are_not_supported(
    captioner: BlipCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    model: Any = captioner.model
    assert not lean_greedy_supported(model, num_beams=2)
    config = model.text_decoder.generation_config
    default = config.repetition_penalty
    monkeypatch.setattr(config, "repetition_penalty", 1.3)
    assert not lean_greedy_supported(model, num_beams=1)
    monkeypatch.setattr(config, "repetition_penalty", default)
    assert lean_greedy_supported(model, num_beams=1)
    monkeypatch.setattr(config, "do_sample", True)
    assert not lean_greedy_supported(model, num_beams=1)


def test_not_blip_is_not_supported() -> None:
    assert not lean_greedy_supported(object(), num_beams=1)


def test_captioner_gives_the_same_captions_with_and_without_the_lean_loop(
    captioner: BlipCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = [
        GenerationOptions(max_new_tokens=9),
        GenerationOptions(prompt="a picture of"),
        GenerationOptions(max_new_tokens=9),
        GenerationOptions(num_beams=2, max_new_tokens=4),
    ]
    calls: list[int] = []
    real = captioner.model.generate
    monkeypatch.setattr(
        captioner.model, "generate", lambda **kw: calls.append(kw["num_beams"]) or real(**kw)
    )
    lean = captioner.caption(images(4), options)
    assert calls == [2]  # only the beam-search group went to generate()
    monkeypatch.setattr(captioner, "lean_decoder", False)
    assert captioner.caption(images(4), options) == lean
    assert calls == [2, 1, 1, 2]
