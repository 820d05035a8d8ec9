"""The hypernetwork F_φ that maps a noise level λ to the r × r core, and the embeddings e(λ) it reads."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn

from .._compat import apply_keeping_dtype
from .config import NaRAConfig


class FourierEmbedding(nn.Module):
    """Fixed Gaussian Fourier features: e(λ) = [sin(λ·W), cos(λ·W)], W ~ N(0, σ²), shape ``[1, dim/2]``.

    W is a persistent buffer (saved with the adapter; it depends on the seed at creation). There is no 2π
    factor, as in the authors' code. Computed in float32.
    """

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("W", torch.randn(1, dim // 2) * scale)

    @property
    def out_dim(self) -> int:
        return 2 * self.W.shape[1]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FourierEmbedding:
        # Casting a model to fp16/bf16 must not round the frequencies (|W| ~ 16 would lose ~1e-2 rad): W follows
        # device moves but stays float32.
        return apply_keeping_dtype(self, fn, recurse, ["W"])

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        """``[B]`` → ``[B, dim]``."""
        proj = lam.float().unsqueeze(-1) * self.W.float()
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class MLPEmbedding(nn.Module):
    """Learned embedding: ``Linear(1 → dim) → SiLU``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(1, dim)
        self.out_dim = dim

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        """``[B]`` → ``[B, dim]``."""
        return nn.functional.silu(self.proj(lam.unsqueeze(-1).to(self.proj.weight.dtype)))


class RawEmbedding(nn.Module):
    """λ itself as a one-dimensional input."""

    out_dim = 1

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        """``[B]`` → ``[B, 1]``."""
        return lam.float().unsqueeze(-1)


def build_embedding(config: NaRAConfig) -> nn.Module:
    """The embedding module named by ``config.embedding``."""
    if config.embedding == "fourier":
        return FourierEmbedding(config.embedding_dim, config.fourier_scale)
    if config.embedding == "mlp":
        return MLPEmbedding(config.embedding_dim)
    return RawEmbedding()


class CoreGenerator(nn.Module):
    """F_φ: ``Linear(in → h1) → SiLU → … → Linear(h_k → r²)``.

    Hidden layers get Kaiming-uniform weights (a=√5) and zero biases; the last layer starts at zero, so the
    generated deviation is zero at initialisation and C(λ) = I. The layers sit at indices 0, 2, 4, … of
    ``layers``, the same layout as the authors' mapper.
    """

    def __init__(self, in_dim: int, hidden_dims: tuple[int, ...], r: int) -> None:
        super().__init__()
        widths = [in_dim, *hidden_dims, r * r]
        modules: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(widths)):
            if i:
                modules.append(nn.SiLU())
            modules.append(nn.Linear(d_in, d_out))
        self.layers = nn.Sequential(*modules)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for layer in linears[:-1]:
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(linears[-1].weight)
        nn.init.zeros_(linears[-1].bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim]`` → ``[B, r²]``."""
        return self.layers(emb.to(self.layers[0].weight.dtype))
