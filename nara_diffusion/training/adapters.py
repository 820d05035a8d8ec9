"""Which parameters a run trains: NaRA, NaRA-C, peft's own LoRA, or the whole model (the ``--adapter`` choice).

Internal to the training scripts: it only picks among the kinds and calls ``nd.get_nara_model`` or
``peft.get_peft_model``. Users attach with ``nd.get_nara_model`` / ``nd.inject_nara``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import peft
from torch import nn

from ..core import NaRAConfig, get_nara_model

ADAPTERS = ("nara", "nara-c", "lora", "full")


def adapter_config(
    kind: str,
    *,
    r: int = 32,
    target_modules: Optional[Union[list[str], str]] = None,
    lora_dropout: float = 0.05,
    scaling: float = 1.0,
    **options: Any,
) -> Union[peft.LoraConfig, NaRAConfig]:
    """The config of an adapter ``kind`` (``"nara"``, ``"nara-c"`` or ``"lora"``) with one low-rank branch for all:
    the same rank, targets, dropout and branch scale s (LoRA's ``lora_alpha = scaling·r``), so that kinds compare
    like for like. ``options`` are further fields of that kind's config (``core_scale``, ``hidden_dims`` … for NaRA;
    ``init_lora_weights`` … for LoRA)."""
    if kind == "lora":
        nara_only = sorted(set(options) & {f.name for f in dataclasses.fields(NaRAConfig)} - _LORA_FIELDS)
        if nara_only:
            raise ValueError(f"Options {nara_only} are NaRA options; they do not apply to LoRA.")
        return peft.LoraConfig(
            r=r, lora_alpha=scaling * r, target_modules=target_modules, lora_dropout=lora_dropout, **options
        )
    if kind not in ("nara", "nara-c"):
        raise ValueError(f"Unknown adapter {kind!r}; choose one of {', '.join(ADAPTERS)}.")
    core = "constant" if kind == "nara-c" else "noise"
    return NaRAConfig(
        r=r, target_modules=target_modules, lora_dropout=lora_dropout, scaling=scaling, core=core, **options
    )


_LORA_FIELDS = {f.name for f in dataclasses.fields(peft.LoraConfig)}


def attach_adapter(
    model: nn.Module,
    kind: str,
    *,
    r: int = 32,
    target_modules: Optional[Union[list[str], str]] = None,
    lora_dropout: float = 0.05,
    scaling: float = 1.0,
    **nara_options: Any,
) -> nn.Module:
    """Prepare ``model`` for training with the adapter ``kind``.

    Args:
        model: The base model.
        kind: ``"nara"`` (noise-conditioned core), ``"nara-c"`` (constant learned core), ``"lora"`` (peft's
            LoRA with ``lora_alpha = scaling·r``, i.e. the same branch scale s as NaRA) or ``"full"`` (every
            parameter trained, no adapter).
        r, target_modules, lora_dropout, scaling: The low-rank branch, identical for NaRA and LoRA so that
            the two compare at the same rank, targets and scale (`adapter_config`).
        **nara_options: Further `NaRAConfig` fields (``core_scale``, ``embedding``, ``hidden_dims``, ...).

    Returns:
        A peft model (adapters) or ``model`` itself with every parameter trainable (``"full"``).
    """
    if kind not in ADAPTERS:
        raise ValueError(f"Unknown adapter {kind!r}; choose one of {', '.join(ADAPTERS)}.")
    if kind == "full":
        if nara_options:
            raise ValueError(f"Options {sorted(nara_options)} do not apply to full fine-tuning.")
        return model.requires_grad_(True)
    if kind == "lora" and nara_options:
        raise ValueError(f"Options {sorted(nara_options)} are NaRA options; they do not apply to LoRA.")
    branch = {"r": r, "target_modules": target_modules, "lora_dropout": lora_dropout, "scaling": scaling}
    config = adapter_config(kind, **branch, **nara_options)
    return peft.get_peft_model(model, config) if kind == "lora" else get_nara_model(model, config)
