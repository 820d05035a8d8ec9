"""What the text backend reads off a model that may be wrapped: the model inside data-parallel and
``torch.compile`` wrappers, the device of its weights, and its mask token."""

from __future__ import annotations

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


__all__ = ["PARALLEL_WRAPPERS", "model_device", "resolve_mask_token_id", "unwrap_parallel"]
