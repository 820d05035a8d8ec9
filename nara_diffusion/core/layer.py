"""`NaRALinear`: a frozen linear layer plus the noise-conditioned low-rank branch s·B·C(λ)ᵀ·A·dropout(x)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .adapter import NoiseConditionedAdapter
from .config import NaRAConfig

MERGE_IMPOSSIBLE = (
    "NaRA adapters cannot be merged into the base weights: the update B·C(λ)ᵀ·A changes with the noise level "
    "at every step. Keep the adapter unmerged, or call `unload()` to get the base model back."
)


def apply_core(h: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """Multiply the rank-r activations by the core, one core per example or one for the batch.

    Args:
        h: ``[B, ..., r]`` activations ``A·x`` (row vectors, so ``h @ C`` is Bᵀ-side ``Cᵀ·A·x`` in column form).
        core: ``[r, r]`` or ``[1, r, r]`` (shared by the batch) or ``[B, r, r]``.

    Returns:
        ``[B, ..., r]``. One matmul, and for the usual ``[B, L, r]`` activations no reshape either: this runs in
        every adapted layer, where each extra op and autograd node is a fixed cost per layer.
    """
    if core.dim() == 2:
        return h @ core
    if core.shape[0] == 1:
        return h @ core[0]
    if h.dim() < 2 or h.shape[0] != core.shape[0]:
        raise ValueError(
            f"NaRA got {core.shape[0]} noise levels but the layer input has batch dimension "
            f"{h.shape[0] if h.dim() else 'none'} (shape {tuple(h.shape)}); give one noise level per example, "
            "or a scalar. Layers must see the batch as their first input dimension."
        )
    if h.dim() == 3:
        return torch.bmm(h, core)
    if h.dim() == 2:
        return torch.bmm(h.unsqueeze(1), core).squeeze(1)
    return torch.bmm(h.reshape(h.shape[0], -1, h.shape[-1]), core).view(h.shape)


class NaRALayer(BaseTunerLayer):
    """Adapter state of a NaRA-wrapped layer: per adapter name, ``nara_A`` (r × d_in), ``nara_B`` (d_out × r),
    the dropout, the scaling and a plain reference to the model's shared `NoiseConditionedAdapter`
    (``noise_adapters[adapter_name]``)."""

    adapter_layer_names = ("nara_A", "nara_B")
    other_param_names = ("r", "scaling", "base_scaling", "nara_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.base_scaling: dict[str, float] = {}  # s from the config; `scaling` may be rescaled (set_scale)
        self.scaling: dict[str, float] = {}
        self.nara_dropout = nn.ModuleDict({})
        self.nara_A = nn.ModuleDict({})
        self.nara_B = nn.ModuleDict({})
        # A plain dict, not a ModuleDict: the shared `NoiseConditionedAdapter` is owned (and saved, and counted) once,
        # by the tuner; layers only read its current core.
        self.noise_adapters: dict[str, NoiseConditionedAdapter] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"NaRA adapts torch.nn.Linear layers only, got {type(base).__name__}; "
                "remove this module from target_modules."
            )
        self.in_features = base.in_features
        self.out_features = base.out_features

    def update_layer(
        self,
        adapter_name: str,
        noise_adapter: NoiseConditionedAdapter,
        config: NaRAConfig,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create the A, B and dropout of ``adapter_name`` and link the layer to the shared ``noise_adapter``."""
        r = config.r
        self.r[adapter_name] = r
        self.base_scaling[adapter_name] = config.effective_scaling
        self.scaling[adapter_name] = config.effective_scaling
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.nara_dropout[adapter_name] = dropout
        self.nara_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.nara_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.noise_adapters[adapter_name] = noise_adapter
        self.reset_nara_parameters(adapter_name, zero_b=config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_nara_parameters(self, adapter_name: str, zero_b: bool = True) -> None:
        """A: Kaiming-uniform (a=√5); B: zero (or Kaiming-uniform when ``zero_b`` is False)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.nara_A[adapter_name].weight, a=math.sqrt(5))
            if zero_b:
                nn.init.zeros_(self.nara_B[adapter_name].weight)
            else:
                nn.init.kaiming_uniform_(self.nara_B[adapter_name].weight, a=math.sqrt(5))

    # diffusers calls these on every peft layer for ``cross_attention_kwargs={"scale": s}``, as for LoRA
    def set_scale(self, adapter: str, scale: float) -> None:
        """Branch multiplier of ``adapter`` = its configured s × ``scale`` (absolute; 0 gives the base output)."""
        if adapter in self.base_scaling:
            self.scaling[adapter] = self.base_scaling[adapter] * float(scale)

    def scale_layer(self, scale: float) -> None:
        """Multiply the current multiplier of every active adapter by ``scale``."""
        for name in self.active_adapters:
            if name in self.scaling:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        """Undo `scale_layer` (divide by ``scale``), or with None restore the configured multiplier."""
        for name in self.active_adapters:
            if name in self.scaling:
                self.scaling[name] = self.base_scaling[name] if scale is None else self.scaling[name] / scale

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.noise_adapters.pop(adapter_name, None)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(MERGE_IMPOSSIBLE)

    def unmerge(self) -> None:
        raise NotImplementedError(MERGE_IMPOSSIBLE)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError(MERGE_IMPOSSIBLE)


class NaRALinear(nn.Module, NaRALayer):
    """``h = W0·x + Σ_active s · B · C(λ)ᵀ · A · dropout(x)``, with one C per example.

    The low-rank branch runs in the dtype of A (float32 by default) and is cast back to the base output's
    dtype, as in the authors' code.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        noise_adapter: NoiseConditionedAdapter,
        config: NaRAConfig,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        NaRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, noise_adapter, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Runs in every adapted layer at every step: each skipped no-op call (a `.to` to the same dtype, an Identity
        # dropout module) is a few µs, which a small model's decoding step (a few ms over ~16 layers) notices.
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.nara_A:
                continue
            a, b, dropout = self.nara_A[name], self.nara_B[name], self.nara_dropout[name]
            h = x if x.dtype == a.weight.dtype else x.to(a.weight.dtype)
            h = a(h if isinstance(dropout, nn.Identity) else dropout(h))
            core = self.noise_adapters[name].current_core
            if core is not None:
                if core.dtype != h.dtype or core.device != h.device:  # CPU offload may keep the hypernet elsewhere
                    core = core.to(device=h.device, dtype=h.dtype)
                h = apply_core(h, core)
            scaling = self.scaling[name]
            result = result + (b(h) if scaling == 1.0 else b(h) * scaling)  # × 1.0 is exact: skipping it is too
        return result if result.dtype == out_dtype else result.to(out_dtype)

    def __repr__(self) -> str:
        return "nara." + super().__repr__()
