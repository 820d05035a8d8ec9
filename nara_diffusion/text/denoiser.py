"""`Denoiser`: one call of a masked-diffusion LM the way its adapter and family need it (λ for NaRA, the bin of a
noise-bin set, the family's logits shift, logits at chosen positions, a K/V cache), shared by the sampler, the
likelihood estimator and the noise profile; `MaskRatio`, the exact λ a call receives; `memoize_cores` for evaluation
loops."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, NamedTuple, Optional

import peft
import torch
import torch.nn.functional as F
from torch import nn

from nara_diffusion.core.noise import ComputedNoiseLevel
from nara_diffusion.core.tuner import memoized_cores, precompute_cores

from .kv_cache import KVCache
from .model_info import logits_shift, model_device, unwrap_parallel
from .noise_bins import noise_bin, noise_bin_count, noise_bin_name
from .objectives import is_noise_conditioned, supports_logits_positions


class MaskRatio(NamedTuple):
    """λ per example as an exact fraction ``masked / total`` (both ``[B]`` long), so noise bins are exact."""

    masked: torch.Tensor
    total: torch.Tensor

    def value(self) -> torch.Tensor:
        """``[B]`` float32 λ = masked / total."""
        return self.masked.float() / self.total.float()

    def bin(self, num_bins: int) -> torch.Tensor:
        """``[B]`` long noise bin ⌈λ·K⌉ clamped to [1, K], computed in integers (`noise_bin`)."""
        return noise_bin(self.masked, self.total, num_bins)

    def subset(self, rows: torch.Tensor) -> MaskRatio:
        return MaskRatio(self.masked[rows], self.total[rows])


class Denoiser:
    """Calls a masked-diffusion LM the way its adapter needs, for the sampler and the likelihood estimator.

    A NaRA model gets ``noise_level=λ``; a noise-bin set gets the adapter of each row's bin; a LoRA or base model
    gets neither. Logits are computed only at the requested positions when the model supports
    ``logits_positions`` (native LLaDA and Dream do). A family whose output at position i predicts token i + shift
    (`logits_shift`: Dream's 1) is read at the row ``position − shift``, position 0 from itself (the convention of
    `nara_diffusion.text.objectives.align_logits`), so row n of the result always predicts the n-th requested
    position, for the sampler and the likelihood alike.

    Use it as a context manager: inside, the model is in eval mode, and with ``memoize_cores`` a NaRA model's cores
    are memoised by λ value (`nara_diffusion.core.tuner.memoized_cores`): the hypernetwork runs once per distinct λ,
    each value alone, and with ``noise_grid=n`` the cores of λ = k / n, k = 0 … n, are computed on entry in one run
    (the sampler's λ take few values, a Monte-Carlo estimator's many). On exit its mode (and, for noise-bin sets, the
    active adapter and which parameters require grad) is restored.

    Attributes:
        noise_conditioned: The model takes ``noise_level=``.
        num_bins: K of a noise-bin set, else None.
        needs_noise_level: Either of the two: λ must be computed before each forward.
        kv_cache: The model takes and returns a K/V cache (``cache=``, ``use_cache=``, ``query_start=``: native
            LLaDA and Dream, bare or with adapters).
    """

    def __init__(self, model: nn.Module, memoize_cores: bool = False, noise_grid: Optional[int] = None) -> None:
        self.model = model
        self.memoize_cores = memoize_cores
        self.noise_grid = noise_grid
        self.noise_conditioned = is_noise_conditioned(model)
        self.num_bins = noise_bin_count(model)
        self.needs_noise_level = self.noise_conditioned or self.num_bins is not None
        self.logits_positions = supports_logits_positions(model)
        self.kv_cache = supports_kv_cache(model)
        self._active: Optional[str] = None
        self._saved: Optional[tuple[bool, Any, dict[str, bool]]] = None
        self._memo: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> Denoiser:
        inner = unwrap_parallel(self.model)
        grads = {n: p.requires_grad for n, p in inner.named_parameters()} if self.num_bins else {}
        self._saved = (self.model.training, getattr(inner, "active_adapter", None), grads)
        self.model.eval()
        self._memo = contextlib.ExitStack()
        if self.noise_conditioned and self.memoize_cores:
            self._memo.enter_context(memoized_cores(inner))
            if self.noise_grid:  # λ = k / n only: every core in one hypernetwork run, before the first step
                grid = torch.arange(self.noise_grid + 1, device=model_device(inner)).float() / float(self.noise_grid)
                precompute_cores(inner, grid)
        return self

    def __exit__(self, *exc: object) -> None:
        training, adapter, grads = self._saved
        inner = unwrap_parallel(self.model)
        if self._memo is not None:
            self._memo.close()
            self._memo = None
        if self.num_bins and adapter is not None:
            inner.set_adapter(adapter)
            for name, param in inner.named_parameters():
                param.requires_grad_(grads.get(name, param.requires_grad))
        self._active = None
        self.model.train(training)

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        noise: Optional[MaskRatio] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits at ``positions``.

        Args:
            input_ids: ``[B, L]``.
            positions: ``[B, L]`` bool; result rows follow ``positions.nonzero()`` (row-major).
            noise: λ per row (required when `needs_noise_level`).
            attention_mask: ``[B, L]`` or None.

        Returns:
            ``[N, V]`` logits, N = ``positions.sum()``.
        """
        return self.cached(input_ids, positions, noise, attention_mask)[0]

    def cached(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        noise: Optional[MaskRatio] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        cache: Optional[KVCache] = None,
        query_start: int = 0,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Optional[KVCache]]:
        """`__call__` with a K/V cache (models with `kv_cache` only).

        ``input_ids`` and ``positions`` are ``[B, n]``, positions ``query_start …`` of the sequence; ``cache`` holds
        the K/V of the other positions; ``attention_mask`` covers the whole sequence. Returns the logits and, with
        ``use_cache``, the K/V of every position (rows of different noise bins run apart and are merged back). For a
        shifted family a position is read from the input's row ``shift`` places before it, so with ``query_start``
        > 0 the first ``shift`` input positions cannot be asked for (their rows lie before the input): start the
        input that much earlier.
        """
        if self.needs_noise_level and noise is None:
            raise ValueError("This model is conditioned on the noise level; pass noise=MaskRatio(...).")
        cache_kw: dict[str, Any] = {}
        if cache is not None or use_cache:
            if not self.kv_cache:
                raise ValueError(f"{type(self.model).__name__} takes no K/V cache.")
            cache_kw = {"cache": cache, "query_start": query_start, "use_cache": use_cache}
        lam = noise.value() if self.noise_conditioned else None
        if self.num_bins is None:
            return self._run(input_ids, positions, lam, attention_mask, cache_kw)
        bins = noise.bin(self.num_bins)
        present = sorted(set(bins.tolist()))  # host sync: switching adapters is a host operation
        if len(present) == 1:
            self.use_bin(present[0])
            return self._run(input_ids, positions, lam, attention_mask, cache_kw)
        pos_rows = positions.nonzero()[:, 0]
        out: Optional[torch.Tensor] = None
        caches: list[tuple[torch.Tensor, KVCache]] = []
        for index in present:
            rows = (bins == index).nonzero().squeeze(1)
            self.use_bin(index)
            part_kw = dict(cache_kw, cache=cache.select(rows)) if cache is not None else cache_kw
            logits, part_cache = self._run(
                input_ids[rows],
                positions[rows],
                None if lam is None else lam[rows],
                None if attention_mask is None else attention_mask[rows],
                part_kw,
            )
            if out is None:
                out = logits.new_empty((pos_rows.numel(), logits.shape[-1]))
            out[bins[pos_rows] == index] = logits
            if part_cache is not None:
                caches.append((rows, part_cache))
        return out, (KVCache.merge(caches, input_ids.shape[0]) if caches else None)

    def use_bin(self, index: int) -> None:
        """Make the adapter of noise bin ``index`` (1-based) active, if it is not already."""
        name = noise_bin_name(index)
        if name != self._active:
            unwrap_parallel(self.model).set_adapter(name, inference_mode=True)
            self._active = name

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        lam: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        cache_kw: dict[str, Any],
    ) -> tuple[torch.Tensor, Optional[KVCache]]:
        if not cache_kw:
            return self._forward(input_ids, positions, lam, attention_mask), None
        return self._forward(input_ids, positions, lam, attention_mask, cache_kw)

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        lam: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        cache_kw: Optional[dict[str, Any]] = None,
    ) -> Any:
        """One model call: the ``[N, V]`` logits that predict the tokens at ``positions`` (the family's shift applied),
        or with ``cache_kw`` (logits, the returned cache)."""
        kwargs: dict[str, Any] = dict(cache_kw or {})
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if lam is not None:
            kwargs["noise_level"] = ComputedNoiseLevel(lam)  # the canvas's mask fraction: in [0, 1] by construction
        shift = self.logits_shift
        early = bool(shift) and bool(positions[:, :shift].any())  # positions that read row 0 (one host sync)
        query_start = (cache_kw or {}).get("query_start") or 0
        if early and query_start:
            raise ValueError(
                f"The logits are shifted by {shift}: the first {shift} position(s) of an input that starts at "
                f"query_start={query_start} are predicted by outputs before it; start the input at "
                f"query_start={query_start - shift} and ask for the positions after."
            )
        # the rows that predict `positions`; a position below the shift reads row 0, which a row request cannot repeat
        rows = positions if not shift else F.pad(positions[:, shift:], (0, shift), value=False)
        if self.logits_positions and not early:
            kwargs["logits_positions"] = rows
        output = self.model(input_ids, **kwargs)
        logits = output.logits
        if logits.dim() == 3 and not shift:
            logits = logits[positions]
        elif logits.dim() == 3:  # align_logits(logits, shift)[positions], without copying the full logits
            row, col = positions.nonzero(as_tuple=True)
            logits = logits[row, (col - shift).clamp(min=0)]
        if cache_kw is None:
            return logits
        return logits, (getattr(output, "cache", None) if kwargs.get("use_cache") else None)

    @functools.cached_property
    def logits_shift(self) -> int:
        """How far ahead the model predicts (`nara_diffusion.text.model_info.logits_shift`: LLaDA 0, Dream 1)."""
        return logits_shift(self.model)


def memoize_cores(model: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which a NaRA model's cores C(λ) are memoised by λ value across `generate` calls (each call
    memoises its own anyway): for evaluation loops, whose λ grid (``k / gen_length``) repeats from batch to batch. The
    adapter's weights must not change inside. The cores are those a call computes on its own (the sampler's grid in
    one run, other values alone), so tokens do not depend on the loop; a no-op for other models."""
    if not is_noise_conditioned(model):
        return contextlib.nullcontext()
    return memoized_cores(unwrap_parallel(model))


def supports_kv_cache(model: nn.Module) -> bool:
    """True when the innermost model's ``forward`` takes ``cache``, ``use_cache`` and ``query_start`` (native LLaDA
    and Dream; peft wrappers seen through)."""
    model = unwrap_parallel(model)
    while isinstance(model, peft.PeftModel):
        model = unwrap_parallel(model.get_base_model())
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in ("cache", "use_cache", "query_start"))


__all__ = ["Denoiser", "MaskRatio", "memoize_cores", "supports_kv_cache"]
