"""The captioner seam: a batch of images and options in, one caption per image out.

`Captioner` is the Protocol the pipeline depends on; `BlipCaptioner` is the real one
(HF transformers, loaded with `from_pretrained`). Captioning is synchronous and CPU/GPU
bound: callers run it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from captionstream.errors import ModelLoadError
from captionstream.processor.greedy import lean_greedy, lean_greedy_supported
from captionstream.processor.precision import cpu_has_native_bf16, resolve_precision
from captionstream.processor.tiny_blip import TINY_BLIP, build_tiny_blip
from captionstream.schemas.events import GenerationOptions

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class Captioner(Protocol):
    """A batch of images plus per-image options in, exactly one caption per image out.

    A captioner may also have `input_size: tuple[int, int] | None`, the (width, height)
    its model shrinks every image to: JPEGs are then decoded no larger than needed
    (`processor.pipeline.decode_rgb`).
    """

    name: str

    def caption(self, images: Sequence[Image], options: Sequence[GenerationOptions]) -> list[str]:
        """Return exactly one caption per image, in order."""
        ...


def input_size_of(image_processor: Any) -> tuple[int, int] | None:
    """The smallest (width, height) an HF image processor's resize keeps both sides at
    or above, from its `size` (`height`/`width`, or `shortest_edge`; a dict or
    transformers' `SizeDict`); None if unknown."""
    size = getattr(image_processor, "size", None)

    def field(name: str) -> int | None:
        value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
        return value if isinstance(value, int) and value > 0 else None

    height, width, shortest = field("height"), field("width"), field("shortest_edge")
    if height is not None and width is not None:
        return (width, height)
    if shortest is not None:
        return (shortest, shortest)
    return None


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    max_new_tokens: int = 30
    num_beams: int = 1


def select_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_source(model: str, data_dir: Path) -> str:
    """Map the `model` setting to what `from_pretrained` takes (hub id or directory)."""
    if model == TINY_BLIP:
        return str(build_tiny_blip(data_dir / "models" / TINY_BLIP))
    return model


GenerationKey = tuple[int, int, str | None]  # max_new_tokens, num_beams, prompt


def caption_in_groups(
    images: Sequence[Image],
    options: Sequence[GenerationOptions],
    defaults: GenerationDefaults,
    generate: Callable[[list[Image], GenerationKey], list[str]],
) -> list[str]:
    """Run `generate` once per distinct (max_new_tokens, num_beams, prompt) and put the
    captions back in input order: one caption per image, whatever the mix of options."""
    if len(images) != len(options):
        raise ValueError("one GenerationOptions per image")
    groups: dict[GenerationKey, list[int]] = {}
    for i, opt in enumerate(options):
        key = (
            opt.max_new_tokens or defaults.max_new_tokens,
            opt.num_beams or defaults.num_beams,
            opt.prompt,
        )
        groups.setdefault(key, []).append(i)
    captions = [""] * len(images)
    for key, indices in groups.items():
        texts = generate([images[i] for i in indices], key)
        for i, text in zip(indices, texts, strict=True):
            captions[i] = text
    return captions


def model_load_error(model: str, exc: BaseException, hint: str) -> ModelLoadError:
    """The error a worker exits with when `from_pretrained` fails: fast, and naming the
    setting to change (no silent fallback to another model)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return ModelLoadError(
        f"cannot load captioning model {model!r}"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {exc}. {hint}"
    )


class BlipCaptioner:
    """BLIP (`BlipForConditionalGeneration`), batched, under `torch.inference_mode`.

    Greedy captions (one beam) go through `processor.greedy.lean_greedy` when
    `lean_decoder` is on and the model's generation config allows it: the same token ids
    as `model.generate()`, with less work per token. Everything else uses `generate()`.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: str,
        name: str,
        defaults: GenerationDefaults,
        lean_decoder: bool = True,
    ) -> None:
        self.model = model
        self.processor = processor
        self.input_size = input_size_of(getattr(processor, "image_processor", None))
        self.device = device
        self.name = name
        self.defaults = defaults
        self.lean_decoder = lean_decoder

    @classmethod
    def load(
        cls,
        model: str,
        *,
        data_dir: Path,
        device: str = "auto",
        precision: str = "auto",
        defaults: GenerationDefaults | None = None,
        lean_decoder: bool = True,
        prepack_weights: bool = True,
        vision_attention: str = "auto",
    ) -> BlipCaptioner:
        """Load `model` onto `device` in `precision` (see `processor.precision`);
        `prepack_weights`: see `processor.packing` (CPU: bf16, and fp32 decoding);
        `vision_attention`: see `processor.attention`."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from captionstream.processor.attention import (
            VisionAttention,
            resolve_vision_attention,
            use_sdpa_vision_attention,
        )
        from captionstream.processor.packing import prepack_linears

        device = select_device(device)
        # A bad precision setting fails before the (slow) model load.
        chosen = resolve_precision(
            precision,
            device,
            cpu_has_bf16=device.startswith("cpu") and cpu_has_native_bf16(),
        )
        attention = resolve_vision_attention(vision_attention, device, chosen.dtype)
        source = resolve_model_source(model, data_dir)
        try:
            processor = BlipProcessor.from_pretrained(source)
            net: Any = BlipForConditionalGeneration.from_pretrained(source, dtype=chosen.dtype)
        except (OSError, ValueError) as exc:
            raise model_load_error(
                model,
                exc,
                "Set CAPTIONSTREAM_MODEL to a local directory holding a saved BLIP model, "
                f"or to {TINY_BLIP!r} for a tiny random test model.",
            ) from exc
        net.to(device).eval()
        fused = use_sdpa_vision_attention(net) if attention is VisionAttention.SDPA else 0
        packed = prepack_linears(net) if prepack_weights else 0
        # BLIP's generate() runs its text decoder, whose generation config is built from
        # the text config and ignores the model's saved generation_config.json: hand that
        # over, so what the model ships with (e.g. min_new_tokens) applies. Our explicit
        # max_new_tokens / num_beams still override it per call.
        decoder = getattr(net, "text_decoder", None)
        if decoder is not None:
            decoder.generation_config = net.generation_config
        log.info(
            "loaded model %s on %s in %s (%s; CAPTIONSTREAM_PRECISION=%s); greedy decoding: "
            "%s; %d linear layers with pre-packed weights; vision attention: %s (%d layers fused)",
            model,
            device,
            chosen.value,
            net.dtype,
            precision,
            "lean loop" if lean_decoder and lean_greedy_supported(net, 1) else "generate()",
            packed,
            attention.value,
            fused,
        )
        return cls(
            net,
            processor,
            device,
            name=model,
            defaults=defaults or GenerationDefaults(),
            lean_decoder=lean_decoder,
        )

    def caption(self, images: Sequence[Image], options: Sequence[GenerationOptions]) -> list[str]:
        return caption_in_groups(images, options, self.defaults, self._generate)

    def _generate(self, images: list[Image], key: GenerationKey) -> list[str]:
        import torch

        max_new_tokens, num_beams, prompt = key
        text = [prompt] * len(images) if prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
        # The processor makes fp32 pixels; a bf16/fp16 model needs its own dtype.
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            mask = inputs.get("attention_mask")
            unpadded = mask is None or bool(mask.all())  # one prompt per group: no padding
            if self.lean_decoder and unpadded and lean_greedy_supported(self.model, num_beams):
                ids = lean_greedy(
                    self.model, inputs["pixel_values"], inputs.get("input_ids"), max_new_tokens
                )
            else:
                ids = self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, num_beams=num_beams
                )
        return [s.strip() for s in self.processor.batch_decode(ids, skip_special_tokens=True)]
