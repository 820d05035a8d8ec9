"""`LLaDACache`: the keys and values of every layer of a native LLaDA, for Fast-dLLM-style block caching.

LLaDA's attention is bidirectional, so nothing is ever exactly "past": a cache is an approximation that holds the K/V
some positions had when it was filled. The sampler (`nara_diffusion.text.sampler.generate`, ``cache=``) fills one at
the first step of each block with a full forward and reuses it for the block's later steps:

- ``"prefix"``: the cache is cut to the prompt and the finished blocks (`crop`); later steps run the current block
  and everything after it;
- ``"dual"``: the whole cache is kept; later steps run the current block only, attending to the cached prefix and
  suffix and to the block's own fresh K/V.

Keys are stored after RoPE (at each row's own positions, see `LLaDAModelLM.forward`) and before GQA's head
repetition: ``keys[i]``, ``values[i]`` are ``[B, n_kv_heads, L, head_dim]`` for layer ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LLaDACache:
    """Per-layer keys and values ``[B, n_kv_heads, L, head_dim]`` of positions ``0 … L-1`` of a batch."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        if len(keys) != len(values) or not keys:
            raise ValueError(f"LLaDACache needs one key and one value tensor per layer, got {len(keys)}/{len(values)}.")
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

    def crop(self, end: int) -> LLaDACache:
        """Positions ``0 … end-1`` only (views, no copy): the prefix cache."""
        return LLaDACache([k[:, :, :end] for k in self.keys], [v[:, :, :end] for v in self.values])

    def select(self, rows: torch.Tensor) -> LLaDACache:
        """The cache of batch rows ``rows`` (``[n]`` long)."""
        return LLaDACache([k[rows] for k in self.keys], [v[rows] for v in self.values])

    @staticmethod
    def merge(parts: Sequence[tuple[torch.Tensor, LLaDACache]], batch_size: int) -> LLaDACache:
        """One cache of ``batch_size`` rows from caches of row subsets ``(rows [n] long, cache)`` that cover it (the
        noise-bin sampler runs rows of different bins in separate forwards)."""
        first = parts[0][1]
        keys = [k.new_empty((batch_size, *k.shape[1:])) for k in first.keys]
        values = [v.new_empty((batch_size, *v.shape[1:])) for v in first.values]
        for rows, part in parts:
            for layer in range(len(first)):
                keys[layer][rows] = part.keys[layer]
                values[layer][rows] = part.values[layer]
        return LLaDACache(keys, values)


__all__ = ["LLaDACache"]
