"""A lean greedy decoding loop for BLIP's text decoder (`BlipForConditionalGeneration`).

`model.generate()` is general: per step it builds attention masks, routes a cache object
through every layer, runs a list of logits processors and stopping criteria. For the
case the service runs most (greedy, one beam, nothing else asked of the generation
config) this module does only the arithmetic, with the model's own layers and in the
same order, so it yields the same token ids as `generate()` (a test checks it):

- the image's cross-attention keys/values are computed once, before the first step (as
  `generate()` does, through its cache);
- each step feeds only the newest token through the decoder, with plain tensors as the
  self-attention key/value cache;
- masks that would add zeros (all-ones attention masks) are skipped.

`lean_greedy_supported` says whether a model/generation config is covered; anything else
(beams, sampling, repetition penalties, forced tokens, ...) goes to `generate()`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Generation-config fields (non-default values) that greedy decoding here honours or
# that have no effect on it. Anything else makes `lean_greedy_supported` say no.
_HONOURED = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "max_length",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "transformers_version",
        "_from_model_config",
        "use_cache",
        # only shape what return_dict_in_generate returns (not allowed here)
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        # sampling-only knobs: ignored when do_sample is False
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "min_p",
        "epsilon_cutoff",
        "eta_cutoff",
    }
)


def lean_greedy_supported(model: Any, num_beams: int) -> bool:
    """Whether `lean_greedy` gives exactly what `model.generate` would for this call."""
    decoder: Any = getattr(model, "text_decoder", None)
    bert = getattr(decoder, "bert", None)
    if num_beams != 1 or decoder is None or bert is None or not hasattr(model, "vision_model"):
        return False
    if getattr(bert.config, "_attn_implementation", "eager") not in (None, "eager"):
        return False
    config = decoder.generation_config
    if config.do_sample or (config.num_beams or 1) != 1 or (config.min_length or 0) > 0:
        return False
    return set(config.to_diff_dict()) <= _HONOURED | {"do_sample", "num_beams", "min_length"}


def lean_greedy(
    model: Any,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor | None,
    max_new_tokens: int,
) -> torch.Tensor:
    """What `model.generate(pixel_values=..., input_ids=..., max_new_tokens=...)` returns
    for greedy decoding: the start token, any prompt, then the generated ids (rows that
    ended early padded), shape (batch, prompt + steps run). Call under inference mode."""
    import torch

    decoder = model.text_decoder
    bert = decoder.bert
    text_config = model.config.text_config
    generation = decoder.generation_config
    eos = text_config.sep_token_id
    pad = text_config.pad_token_id
    min_new_tokens = generation.min_new_tokens or 0

    image_embeds = model.vision_model(pixel_values=pixel_values)[0]
    batch = image_embeds.shape[0]
    if input_ids is None:
        ids = torch.tensor([[model.decoder_input_ids]], device=image_embeds.device)
        ids = ids.repeat(batch, 1)
    else:
        ids = input_ids[:, :-1].clone()  # BLIP drops the tokenizer's trailing [SEP]
    ids[:, 0] = text_config.bos_token_id

    layers = bert.encoder.layer
    heads = layers[0].attention.self.num_attention_heads
    head_size = layers[0].attention.self.attention_head_size
    scale = math.sqrt(head_size)

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, S, H*D) -> (B, H, S, D)
        return x.view(*x.shape[:-1], heads, head_size).transpose(1, 2)

    def attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # BlipTextSelfAttention's eager arithmetic, op for op.
        scores = torch.matmul(q, k.transpose(-1, -2)) / scale
        if mask is not None:
            scores = scores + mask
        probs = torch.nn.functional.softmax(scores, dim=-1)
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return context.view(*context.shape[:-2], heads * head_size)

    # The image's keys and values for every layer's cross-attention, once.
    cross = []
    for layer in layers:
        attention = layer.crossattention.self
        cross.append(
            (
                split(attention.key(image_embeds)).contiguous(),
                split(attention.value(image_embeds)).contiguous(),
            )
        )
    cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)

    prompt = ids.shape[1]
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    step_ids = ids
    for _ in range(max_new_tokens):
        past = ids.shape[1] - step_ids.shape[1]
        hidden = bert.embeddings(input_ids=step_ids, past_key_values_length=past)
        length = step_ids.shape[1]
        causal = None
        if length > 1:  # the prompt, all at once: each position sees itself and before
            causal = torch.full(
                (length, length),
                torch.finfo(hidden.dtype).min,
                dtype=hidden.dtype,
                device=hidden.device,
            ).triu(1)
        for i, layer in enumerate(layers):
            attention = layer.attention.self
            q = split(attention.query(hidden))
            k = split(attention.key(hidden))
            v = split(attention.value(hidden))
            previous = cache[i]
            if previous is not None:
                k = torch.cat([previous[0], k], dim=-2)
                v = torch.cat([previous[1], v], dim=-2)
            cache[i] = (k, v)
            attended = layer.attention.output(attend(q, k, v, causal), hidden)
            crossing = layer.crossattention.self
            q = split(crossing.query(attended))
            crossed = layer.crossattention.output(attend(q, *cross[i], None), attended)
            hidden = layer.output(layer.intermediate(crossed), crossed)
        logits = decoder.cls(hidden[:, -1:, :])[:, -1].to(dtype=torch.float32)
        if ids.shape[1] - prompt < min_new_tokens:
            logits[:, eos] = -math.inf
        chosen = torch.argmax(logits, dim=-1)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
        ids = torch.cat([ids, chosen[:, None]], dim=-1)
        unfinished &= chosen != eos
        if not bool(unfinished.any()):
            break
        step_ids = chosen[:, None]
    return ids
