"""`KVCache` (also importable as `LLaDACache`): the keys and values of every layer of a native LLaDA or Dream, for
Fast-dLLM-style block caching; `check_cache_call`, the checks a model runs on a call's cache arguments.

Both models attend both ways, so nothing is ever exactly "past": a cache is an approximation that holds the K/V some
positions had when it was filled. The sampler (`nara_diffusion.text.sampler.generate`, ``cache=``) fills one at the
first step of each block with a full forward and reuses it for the block's later steps:

- ``"prefix"``: the cache is cut to the prompt and the finished blocks (`crop`); later steps run the current block
  and everything after it;
- ``"dual"``: the whole cache is kept; later steps run the current block only, attending to the cached prefix and
  suffix and to the block's own fresh K/V.

A family whose logits are shifted (Dream: the output at position i predicts token i + 1) also runs the position
before the block at later steps, whose output predicts the block's first position (see the sampler's docstring).

Keys are stored after RoPE (at each row's own positions) and before GQA's head repetition: ``keys[i]``, ``values[i]``
are ``[B, n_kv_heads, L, head_dim]`` for layer ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch


class KVCache:
    """Per-layer keys and values ``[B, n_kv_heads, L, head_dim]`` of positions ``0 … L-1`` of a batch."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        if len(keys) != len(values) or not keys:
            raise ValueError(f"KVCache needs a key and a value tensor per layer, got {len(keys)} / {len(values)}.")
        self.keys, self.values = list(keys), list(values)

    @property
    def length(self) -> int:
        """Positions cached, L."""
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def __len__(self) -> int:
        """Number of layers."""
        return len(self.keys)

    def crop(self, end: int) -> KVCache:
        """Positions ``0 … end-1`` only (views, no copy): the prefix cache."""
        return KVCache([k[:, :, :end] for k in self.keys], [v[:, :, :end] for v in self.values])

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of batch rows ``rows`` (``[n]`` long)."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values])

    @staticmethod
    def merge(parts: Sequence[tuple[torch.Tensor, KVCache]], batch_size: int) -> KVCache:
        """One cache of ``batch_size`` rows from caches of row subsets ``(rows [n] long, cache)`` that cover it (the
        noise-bin sampler runs rows of different bins in separate forwards)."""
        first = parts[0][1]
        keys = [k.new_empty((batch_size, *k.shape[1:])) for k in first.keys]
        values = [v.new_empty((batch_size, *v.shape[1:])) for v in first.values]
        for rows, part in parts:
            for layer in range(len(first)):
                keys[layer][rows] = part.keys[layer]
                values[layer][rows] = part.values[layer]
        return KVCache(keys, values)


#: The name the cache had when native LLaDA was the only model that took one.
LLaDACache = KVCache


def check_cache_call(
    cache: Optional[KVCache],
    query_start: Optional[int],
    *,
    num_layers: int,
    batch_size: int,
    seq_len: int,
    training: bool,
    family: str,
) -> tuple[int, int]:
    """(first position of the input, length of the whole sequence) of a forward with ``seq_len`` input positions,
    after checking its cache arguments: inference only; the cache must end where the input starts (prefix) or cover
    it (dual)."""
    if cache is not None and training and torch.is_grad_enabled():
        raise ValueError(
            f"{family}'s K/V cache is for inference (its K/V are an approximation under bidirectional attention): "
            "call model.eval() or run under torch.no_grad(), or drop use_cache / cache."
        )
    if cache is None:
        if query_start not in (None, 0):
            raise ValueError(f"query_start={query_start} needs a cache (the K/V of the other positions).")
        return 0, seq_len
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a KVCache (from a forward with use_cache=True), got {type(cache).__name__}.")
    start = cache.length if query_start is None else int(query_start)
    if len(cache) != num_layers or cache.batch_size != batch_size:
        raise ValueError(
            f"The cache holds {len(cache)} layers × batch {cache.batch_size}; this call needs {num_layers} × "
            f"{batch_size}."
        )
    if not 0 <= start <= cache.length or not (cache.length == start or cache.length >= start + seq_len):
        raise ValueError(
            f"query_start={start} with {seq_len} input positions does not fit a cache of {cache.length} positions: "
            "the cache must end where the input starts (prefix) or cover the input (dual)."
        )
    return start, max(cache.length, start + seq_len)


__all__ = ["KVCache", "LLaDACache", "check_cache_call"]
