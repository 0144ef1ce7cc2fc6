"""A tiny, randomly initialised BLIP for offline tests and demos.

It is built once with the real BLIP classes, saved with `save_pretrained`, and then
loaded through exactly the same `from_pretrained` path as a hub model. Its captions are
meaningless word salad: it exercises the pipeline, not captioning quality.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_BLIP = "tiny-blip"

_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "by",
    "cat",
    "dog",
    "bird",
    "horse",
    "man",
    "woman",
    "child",
    "people",
    "car",
    "bus",
    "train",
    "boat",
    "tree",
    "sky",
    "grass",
    "water",
    "road",
    "street",
    "house",
    "room",
    "table",
    "chair",
    "window",
    "bed",
    "food",
    "plate",
    "cup",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "yellow",
    "small",
    "large",
    "sitting",
    "standing",
    "walking",
    "picture",
    "photo",
    "view",
    "close",
    "up",
]
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def build_tiny_blip(target: Path, seed: int = 0) -> Path:
    """Write a tiny BLIP (model + processor) to `target` unless it is already there."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = {token: i for i, token in enumerate(_SPECIAL + _WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(  # type: ignore[no-untyped-call]
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": vocab["[DEC]"],
            "sep_token_id": vocab["[SEP]"],
            "pad_token_id": vocab["[PAD]"],
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    # Write to a sibling temp dir and rename: concurrent workers never see half a model.
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
