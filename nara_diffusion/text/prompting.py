"""Prompts in, text out: left padding, stop tokens, decoding, and `generate_texts`, which runs the sampler over
many tokenised prompts in batches of similar length."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from .model_info import model_device, resolve_mask_token_id
from .sampler import generate, memoize_cores
from .trained_sampling import sampler_settings

#: End-of-turn tokens of the chat templates: LLaDA-Instruct's, and Dream-Instruct's (Qwen2's ChatML).
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS, and each end-of-turn token of `END_OF_TURN_TOKENS` the vocabulary has."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: Union[str, torch.device] = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``([B, P] ids, [B, P] attention mask)``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def pad_token_for(tokenizer: Any, mask_token_id: Optional[int]) -> int:
    """The padding id for prompts: the tokenizer's pad token, or EOS when it has none or pads with the mask token."""
    pad = tokenizer.pad_token_id
    if pad is None or pad == mask_token_id:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token to left-pad prompts with.")
    return int(pad)


def decode_generation(tokenizer: Any, ids: Sequence[int], stop_ids: Iterable[int] = ()) -> str:
    """Text of generated ids, cut before the first stop token (EOS/EoT), special tokens removed."""
    ids = [int(i) for i in ids]
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate an answer for each tokenised prompt, in batches of similar length (left-padded), in input order.

    ``generate_kwargs`` go to `generate` (``gen_length``, ``steps``, ``block_length``, ...); a missing or None
    ``gen_length`` is the one the model's adapter was trained for, and another one warns (`sampler_settings`).
    """
    from tqdm.auto import tqdm

    generate_kwargs = sampler_settings(model, generate_kwargs)
    pad = pad_token_for(tokenizer, resolve_mask_token_id(model, generate_kwargs.get("mask_token_id")))
    stops = stop_token_ids(tokenizer)
    device = model_device(model)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    texts: list[Optional[str]] = [None] * len(prompt_ids)
    with memoize_cores(model):  # a NaRA hypernetwork runs once per distinct λ over all batches
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="generating"):
            chunk = order[start : start + batch_size]
            ids, mask = left_pad([prompt_ids[i] for i in chunk], pad, device)
            out = generate(model, ids, attention_mask=mask, **generate_kwargs)
            for row, i in enumerate(chunk):
                texts[i] = decode_generation(tokenizer, out[row, ids.shape[1] :].tolist(), stops)
    return texts


__all__ = ["decode_generation", "generate_texts", "left_pad", "pad_token_for", "stop_token_ids"]
