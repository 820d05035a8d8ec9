"""`NoiseConditionedAdapter`: the one hypernetwork a NaRA model shares across all its adapted layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._compat import in_backward
from .config import NaRAConfig
from .hypernet import CoreGenerator, build_embedding
from .noise import NoiseLevelError, NoiseLevelLike, validate_noise_level


@dataclass
class _ForwardCore:
    """The core of the running forward (set and cleared on every forward: a plain object, since each
    ``nn.Module.__setattr__`` costs a few µs of registration checks)."""

    core: Optional[torch.Tensor] = None
    for_backward: Optional[torch.Tensor] = None  # kept for activation checkpointing's recomputation
    active: bool = False


class NoiseConditionedAdapter(nn.Module):
    """Generates the r × r core C(λ) = I + η · reshape(F_φ(e(λ))) for every adapted layer of one adapter.

    The model-level forward hook calls :meth:`begin_forward` once per forward; every `NaRALinear` then reads
    :attr:`current_core` (shape ``[B, r, r]``, or ``[r, r]`` when one core serves the whole batch, or ``None`` for
    the identity core, where the layer skips the product). :meth:`end_forward` clears it, so a later call without a
    noise level fails instead of reusing a stale core. Activation checkpointing recomputes layers during backward,
    after the forward has ended; those recomputations (and only those) see the core of the forward they belong to.

    Args:
        config: The adapter's `NaRAConfig` (``core``, ``r``, ``core_scale`` and the embedding settings).
    """

    def __init__(self, config: NaRAConfig) -> None:
        super().__init__()
        self.kind = config.core
        self.r = config.r
        self.core_scale = float(config.core_scale)
        if self.kind == "noise":
            self.embedding = build_embedding(config)
            self.generator = CoreGenerator(self.embedding.out_dim, config.hidden_dims, config.r)
        elif self.kind == "constant":
            self.constant = nn.Parameter(torch.zeros(config.r, config.r))
        # Built once: the hot path adds it to the generated deviation at every forward.
        self.register_buffer("eye", torch.eye(config.r), persistent=False)
        self._forward = _ForwardCore()
        self._memo: Optional[dict[float, torch.Tensor]] = None

    @property
    def device(self) -> torch.device:
        """Where the cores are computed: the device of the adapter's buffers (read per forward, so kept O(1))."""
        return self.eye.device

    @property
    def needs_noise_level(self) -> bool:
        return self.kind == "noise"

    def core(self, noise_level: Optional[NoiseLevelLike] = None) -> torch.Tensor:
        """Compute C(λ) for a batch.

        Args:
            noise_level: Normalised λ ∈ [0, 1]: a float, a 0-d tensor or a ``[B]`` tensor. Required for the
                ``"noise"`` core, ignored by ``"constant"`` and ``"identity"``.

        Returns:
            ``[B, r, r]`` float32 tensor (``[1, r, r]`` for a scalar λ or a λ-free core), with autograd.
        """
        lam = None if noise_level is None else validate_noise_level(noise_level, device=self.eye.device)
        if self.kind == "noise" and lam is None:
            raise NoiseLevelError("This NaRA core is conditioned on the noise level: pass noise_level=λ in [0, 1].")
        core = self._compute(lam)
        batch = 1 if lam is None else lam.numel()
        return self.eye.expand(batch, self.r, self.r) if core is None else core.expand(batch, self.r, self.r)

    def _compute(self, lam: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """C for an already validated ``lam`` ``[B]``.

        Returns ``[B, r, r]`` (noise), ``[1, r, r]`` (constant) or None (identity: the layers skip the product).
        """
        if self.kind == "identity":
            return None
        if self.kind == "constant":
            return (self.eye + self.core_scale * self.constant.float()).unsqueeze(0)
        if self._memo is not None and not torch.is_grad_enabled() and not self.training:
            return self._memoized(lam)
        deviation = self.generator(self.embedding(lam)).float().view(-1, self.r, self.r)
        return self.eye + self.core_scale * deviation

    @contextlib.contextmanager
    def memoized_cores(self) -> Iterator[None]:
        """Inside, C(λ) is computed once per distinct λ value and looked up afterwards, while no gradient is recorded
        and the adapter is in eval mode (elsewhere it is computed as usual).

        A sampler's λ takes few values (``k / gen_length``), so this takes the hypernetwork off its per-step path.
        A value met in a forward is computed from that value alone (a batch of one), so it is the same bits whichever
        other λ share the batch; values announced beforehand with `precompute_cores` (a sampler's grid) are computed
        together, in one hypernetwork run. A forward whose λ values are all known runs no hypernetwork at all. Costs
        one host sync per forward (the λ values are read). Not re-entrant: an inner use keeps the outer table.
        """
        if self._memo is not None:
            yield
            return
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def precompute_cores(self, lam: torch.Tensor) -> int:
        """Inside `memoized_cores` (no grad, eval mode): compute the cores of the values of ``lam`` ``[N]`` (validated
        λ) not yet in the table, all in one hypernetwork run, and keep them; elsewhere do nothing.

        For a sampler whose λ can only take known values (``k / gen_length``): one batched run per call instead of
        one run per step. The GEMM of an N-row batch may round differently from N one-row runs (by float32 rounding
        of the hypernetwork's reductions, ~1e-7 relative), so a core's bits depend on how it entered the table, not on
        the batch that uses it: the tokens of a batch stay those of its prompts run alone. Returns how many values
        were computed."""
        if self.kind != "noise" or self._memo is None or torch.is_grad_enabled() or self.training:
            return 0
        missing = list(dict.fromkeys(v for v in lam.tolist() if v not in self._memo))
        if not missing:
            return 0
        values = torch.tensor(missing, dtype=lam.dtype, device=self.eye.device)
        deviation = self.generator(self.embedding(values)).float().view(-1, self.r, self.r)
        for value, core in zip(missing, self.eye + self.core_scale * deviation, strict=True):
            self._memo[value] = core
        return len(missing)

    def _memoized(self, lam: torch.Tensor) -> torch.Tensor:
        """``[B, r, r]`` cores for ``lam`` ``[B]`` from the table, computing each new value alone."""
        values = lam.tolist()
        for i, value in enumerate(values):
            if value not in self._memo:
                deviation = self.generator(self.embedding(lam[i : i + 1])).float().view(self.r, self.r)
                self._memo[value] = self.eye + self.core_scale * deviation
        if len(values) == 1:
            return self._memo[values[0]].unsqueeze(0)
        return torch.stack([self._memo[value] for value in values])

    # -- per-forward state, driven by the model-level hooks -------------------------------------------------
    def begin_forward(self, noise_level: Optional[torch.Tensor]) -> None:
        """Compute the core once for the forward that is starting (λ already validated, shape ``[B]``).

        A core shared by the batch (scalar λ, or the constant core) is kept as ``[r, r]``, so that the layers do not
        each index it (one op and one autograd node per layer fewer).
        """
        core = self._compute(noise_level)
        state = self._forward
        state.core = core[0] if core is not None and core.shape[0] == 1 else core
        state.for_backward = None
        state.active = True

    def end_forward(self) -> None:
        """Forget λ and C; keep C only for recomputation during backward when it carries a graph."""
        state = self._forward
        if state.core is not None and state.core.requires_grad:
            state.for_backward = state.core
        state.core = None
        state.active = False

    @property
    def current_core(self) -> Optional[torch.Tensor]:
        """The core of the running forward: ``[B, r, r]``, ``[r, r]`` (shared by the batch) or ``None`` (identity).

        Raises outside a forward."""
        state = self._forward
        if state.active:
            return state.core
        if state.for_backward is not None and in_backward():
            return state.for_backward
        if self.kind == "identity":
            return None
        raise NoiseLevelError(
            "A NaRA layer ran outside a forward pass of its model, so no noise level is set. Call the model "
            "(not a submodule) with noise_level=λ, or wrap the call in `with nd.noise_level(model, λ):`."
        )

    def __getstate__(self) -> dict:
        # Copies (deepcopy, e.g. for an EMA or a per-thread model) start idle: the per-forward core is not state,
        # and one kept for a backward is not a graph leaf, which deepcopy refuses.
        state = self.__dict__.copy()
        state.update(_forward=_ForwardCore(), _memo=None)
        return state

    def extra_repr(self) -> str:
        return f"core={self.kind!r}, r={self.r}, core_scale={self.core_scale}"
