"""What the text backend reads off a model that may be wrapped: the model inside data-parallel and
``torch.compile`` wrappers, the device of its weights, its mask token, and its family's conventions (the model
family, the logits shift, the names of its projections)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

# Wrappers that keep the real model under ``.module`` (matched by name so torch.distributed is never imported).
PARALLEL_WRAPPERS = ("DataParallel", "DistributedDataParallel", "FullyShardedDataParallel")


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """Strip data-parallel wrappers (``.module``) and ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), in
    any nesting; peft wrappers are kept (they forward what the callers need)."""
    while True:
        if type(model).__name__ in PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter; the CPU for a model without parameters."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def resolve_mask_token_id(model: nn.Module, mask_token_id: Optional[int] = None) -> int:
    """``mask_token_id`` when given, else ``model.config.mask_token_id``.

    Raises:
        ValueError: neither names a mask token.
    """
    if mask_token_id is None:
        mask_token_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError("No mask token: pass mask_token_id= (the model's config has no mask_token_id).")
    return int(mask_token_id)


#: Logits shift of each family whose models do not say it themselves (``model.logits_shift``): the output at position
#: i predicts the token at i + shift. LLaDA predicts in place (0); Dream, initialised from an autoregressive model,
#: predicts the next position (1), also when loaded with the Hub's remote code.
LOGITS_SHIFTS: dict[str, int] = {"llada": 0, "Dream": 1}

#: Module names of the LLaDA recipes (``attn_out``, ``ff_proj``, ``ff_out``) in the Qwen2 layout Dream uses.
_DREAM_NAMES = {"attn_out": "o_proj", "ff_proj": "gate_proj", "ff_out": "down_proj"}


def model_family(model: nn.Module) -> Optional[str]:
    """The ``model_type`` of a (possibly wrapped) model's config, e.g. ``"llada"`` or ``"Dream"``; None without one."""
    config = getattr(unwrap_parallel(model), "config", None)
    return getattr(config, "model_type", None)


def logits_shift(model: nn.Module) -> int:
    """How far ahead a model predicts: the logits at position i are for the token at i + shift (0: LLaDA, 1: Dream).

    Read from the model's ``logits_shift`` attribute (peft wrappers forward it), else from `LOGITS_SHIFTS` by the
    config's ``model_type``, else 0.
    """
    inner = unwrap_parallel(model)
    shift = getattr(inner, "logits_shift", None)
    if shift is None:
        shift = LOGITS_SHIFTS.get(model_family(inner) or "", 0)
    return int(shift)


def family_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """``targets`` in the module names of ``model``'s family: for Dream (Qwen2 layout) the LLaDA names of the recipes
    become ``o_proj`` / ``gate_proj`` / ``down_proj``; for other families they are returned unchanged."""
    if model_family(model) != "Dream":
        return list(targets)
    return [_DREAM_NAMES.get(name, name) for name in targets]


__all__ = [
    "LOGITS_SHIFTS",
    "PARALLEL_WRAPPERS",
    "family_target_modules",
    "logits_shift",
    "model_device",
    "model_family",
    "resolve_mask_token_id",
    "unwrap_parallel",
]
