"""The benchmark model: full-size BLIP-base architecture with random weights.

Speed does not depend on the weights' values, so a randomly initialised model of the
real architecture (224M parameters, 384x384 input, BERT-sized vocabulary) is a fair
stand-in for `Salesforce/blip-image-captioning-base`, which cannot be downloaded here. It
is saved with `save_pretrained` and loaded through the worker's own `from_pretrained`
path. Its generation config fixes the caption length (min == max new tokens), because a
random model would otherwise stop after an arbitrary number of tokens.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

NEW_TOKENS = 20

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _words() -> list[str]:
    """Pronounceable pseudo-words: ba, be, ..., baba, babe, ... (deterministic)."""
    syllables = [c + v for c, v in itertools.product(_CONSONANTS, _VOWELS)]
    words: list[str] = []
    for n in itertools.count(1):
        words.extend("".join(p) for p in itertools.product(syllables, repeat=n))
        if len(words) > 40_000:
            return words
    raise AssertionError("unreachable")


def bert_style_vocab(size: int) -> dict[str, int]:
    """A vocabulary laid out like BERT-base-uncased + BLIP's two extra tokens.

    [PAD]=0, [unused*], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, words, then
    [DEC] (BLIP's bos) and [ENC] as the last two ids.
    """
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = _words()
    tokens.extend(words[: size - len(tokens) - 2])
    tokens.extend(["[DEC]", "[ENC]"])
    if len(tokens) != size:
        raise ValueError(f"cannot build a vocabulary of {size} tokens")
    return {token: i for i, token in enumerate(tokens)}


def build_bench_blip(target: Path, new_tokens: int = NEW_TOKENS, seed: int = 0) -> Path:
    """Write the benchmark model (model + processor) to `target` unless already there."""
    marker = target / "config.json"
    if marker.exists():
        return target
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    config = BlipConfig()  # the BLIP-base architecture: ViT-B/16 at 384x384, BERT-base decoder
    text: Any = config.text_config
    vocab = bert_style_vocab(text.vocab_size)
    assert vocab["[DEC]"] == text.bos_token_id
    assert vocab["[SEP]"] == text.sep_token_id
    assert vocab["[PAD]"] == text.pad_token_id
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=512)
    processor = BlipProcessor(  # type: ignore[no-untyped-call]
        image_processor=BlipImageProcessor(),  # default: 384x384, CLIP mean/std
        tokenizer=tokenizer,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.generation_config.min_new_tokens = new_tokens
    model.generation_config.max_new_tokens = new_tokens
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process built it first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target
