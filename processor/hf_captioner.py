"""A captioner for any HF image-to-text model that `AutoModelForImageTextToText` loads:
vision-encoder-decoder (e.g. ViT-GPT2), GIT, BLIP and friends.

Chosen with CAPTIONSTREAM_CAPTIONER=hf-image-to-text; CAPTIONSTREAM_MODEL names the hub
id or directory as for BLIP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captionstream.processor.captioner import (
    GenerationDefaults,
    GenerationKey,
    caption_in_groups,
    input_size_of,
    model_load_error,
    select_device,
)
from captionstream.processor.precision import cpu_has_native_bf16, resolve_precision
from captionstream.schemas.events import GenerationOptions

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


def load_image_processor(model: str) -> Any:
    """The model's image processor, by the class its config names.

    `AutoImageProcessor` insists on torchvision in transformers 5, while the concrete
    classes fall back to their Pillow implementation: so resolve the class ourselves.
    """
    import transformers
    from transformers.image_processing_base import ImageProcessingMixin

    config, _ = ImageProcessingMixin.get_image_processor_dict(model)
    cls = getattr(transformers, config["image_processor_type"])
    return cls.from_pretrained(model)


class HFImageToTextCaptioner:
    def __init__(
        self,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        device: str,
        name: str,
        defaults: GenerationDefaults,
    ) -> None:
        self.model = model
        self.image_processor = image_processor
        self.input_size = input_size_of(image_processor)
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.defaults = defaults
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))

    @classmethod
    def load(
        cls,
        model: str,
        *,
        data_dir: Path,
        device: str = "auto",
        precision: str = "auto",
        defaults: GenerationDefaults | None = None,
    ) -> HFImageToTextCaptioner:
        """Load `model` onto `device` in `precision`, chosen as for BLIP (see
        `processor.precision`: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32)."""
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        device = select_device(device)
        # A bad precision setting fails before the (slow) model load.
        chosen = resolve_precision(
            precision,
            device,
            cpu_has_bf16=device.startswith("cpu") and cpu_has_native_bf16(),
        )
        try:
            net: Any = AutoModelForImageTextToText.from_pretrained(model, dtype=chosen.dtype)
            image_processor = load_image_processor(model)
            tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError, AttributeError) as exc:
            raise model_load_error(
                model,
                exc,
                "Set CAPTIONSTREAM_MODEL to a local directory holding a saved model.",
            ) from exc
        net.to(device).eval()
        log.info(
            "loaded image-to-text model %s (%s) on %s in %s (%s; CAPTIONSTREAM_PRECISION=%s)",
            model,
            net.config.model_type,
            device,
            chosen.value,
            net.dtype,
            precision,
        )
        return cls(net, image_processor, tokenizer, device, model, defaults or GenerationDefaults())

    def caption(self, images: Sequence[Image], options: Sequence[GenerationOptions]) -> list[str]:
        return caption_in_groups(images, options, self.defaults, self._generate)

    def _generate(self, images: list[Image], key: GenerationKey) -> list[str]:
        import torch

        max_new_tokens, num_beams, prompt = key
        pixel_values = self.image_processor(images=images, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(self.device, dtype=self.model.dtype)
        kwargs: dict[str, Any] = {}
        if prompt:
            ids = self.tokenizer(
                [prompt] * len(images), add_special_tokens=False, return_tensors="pt"
            ).input_ids.to(self.device)
            if self.encoder_decoder:
                start = torch.full(
                    (len(images), 1), self.model.config.decoder_start_token_id, device=self.device
                )
                kwargs["decoder_input_ids"] = torch.cat([start, ids], dim=1)
            else:
                kwargs["input_ids"] = ids
        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=pixel_values,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                **kwargs,
            )
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
