"""Which parameters a run trains: NaRA, NaRA-C, peft's own LoRA, or the whole model (the ``--adapter`` choice).

Internal to the training scripts: it only picks among the kinds and calls ``nd.get_nara_model`` or
``peft.get_peft_model``. Users attach with ``nd.get_nara_model`` / ``nd.inject_nara``.
"""

from __future__ import annotations

from typing import Optional, Union

import peft
from torch import nn

from ..core import NaRAConfig, get_nara_model

ADAPTERS = ("nara", "nara-c", "lora", "full")


def attach_adapter(
    model: nn.Module,
    kind: str,
    *,
    r: int = 32,
    target_modules: Optional[Union[list[str], str]] = None,
    lora_dropout: float = 0.05,
    scaling: float = 1.0,
    **nara_options,
) -> nn.Module:
    """Prepare ``model`` for training with the adapter ``kind``.

    Args:
        model: The base model.
        kind: ``"nara"`` (noise-conditioned core), ``"nara-c"`` (constant learned core), ``"lora"`` (peft's
            LoRA with ``lora_alpha = scaling·r``, i.e. the same branch scale s as NaRA) or ``"full"`` (every
            parameter trained, no adapter).
        r, target_modules, lora_dropout, scaling: The low-rank branch, identical for NaRA and LoRA so that
            the two compare at the same rank, targets and scale.
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
    if kind == "lora":
        if nara_options:
            raise ValueError(f"Options {sorted(nara_options)} are NaRA options; they do not apply to LoRA.")
        config = peft.LoraConfig(r=r, lora_alpha=scaling * r, target_modules=target_modules, lora_dropout=lora_dropout)
        return peft.get_peft_model(model, config)
    config = NaRAConfig(
        r=r,
        target_modules=target_modules,
        lora_dropout=lora_dropout,
        scaling=scaling,
        core="constant" if kind == "nara-c" else "noise",
        **nara_options,
    )
    return get_nara_model(model, config)
