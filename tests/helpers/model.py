"""The tiny random BLIP, loaded in this process without a model hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from captionstream.processor.captioner import BlipCaptioner


def go_offline(mp: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: make the running process agree.
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def load_tiny_blip(data_dir: Path, **options: Any) -> BlipCaptioner:
    """The tiny random BLIP on the CPU, loaded offline."""
    from captionstream.processor.captioner import BlipCaptioner
    from captionstream.processor.tiny_blip import TINY_BLIP

    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp)
        return BlipCaptioner.load(TINY_BLIP, data_dir=data_dir, device="cpu", **options)
