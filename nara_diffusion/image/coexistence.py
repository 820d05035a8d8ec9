"""NaRA beside a diffusers (peft) LoRA on the same model: one nesting, whatever the loading order.

The nesting is always LoRA outside, NaRA inside: ``to_q`` is peft's ``lora.Linear`` whose ``base_layer`` is the
`NaRALinear` whose ``base_layer`` is the original ``nn.Linear``; both branches add to the output. A LoRA loaded
after NaRA nests so by itself (peft wraps the existing layer); `lora_unwrapped` makes a NaRA load after a LoRA
nest the same way.

diffusers' ``unload_lora`` / ``unload_lora_weights`` replace every adapter layer by its innermost base layer
(``get_base_layer`` walks through all of them) and delete ``model.peft_config``, so on their own they strip the
NaRA layers too while NaRA's bookkeeping (``_nara_tuner``, ``nara_hypernet``) stays: `keeping_nara` puts the
NaRA layers back where they were and keeps ``peft_config`` true (NaRA's configs only). NaRA's own unload strips
the LoRA layers around it the same way; `keeping_lora` puts those back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core import NaRAConfig
from ..core.layer import NaRALayer
from ..core.tuner import inplace_tuner


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _own_name(name: str) -> str:
    """The module's name without the ``base_layer`` steps of adapter layers wrapped around it."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


@contextlib.contextmanager
def lora_unwrapped(model: nn.Module) -> Iterator[None]:
    """Inside the block, every peft (LoRA) layer of ``model`` is replaced by its base layer, so NaRA attaches to the
    original ``nn.Linear`` under its own name; on exit each LoRA layer wraps whatever is now at its place (the new
    NaRA layer, or the original layer)."""
    wrapped: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not isinstance(module, NaRALayer):
            if isinstance(getattr(module, "base_layer", None), (nn.Linear, NaRALayer)):
                wrapped.append((*_parent(model, name), module))
    for parent, child, module in wrapped:
        setattr(parent, child, module.base_layer)
    try:
        yield
    finally:
        for parent, child, module in wrapped:
            module.base_layer = getattr(parent, child)
            setattr(parent, child, module)


def _reseat(model: nn.Module, layers: list[tuple[str, nn.Module]], what: str) -> None:
    """Put each adapter layer back at its own name, around the base layer an unload left there."""
    for name, layer in layers:
        parent, child = _parent(model, name)
        current = getattr(parent, child)
        if current is layer:
            continue
        if current is not layer.get_base_layer():
            raise RuntimeError(
                f"After the unload, {name} of {type(model).__name__} is a {type(current).__name__}, not the layer the "
                f"{what} adapted; the {what} cannot be kept."
            )
        layer.base_layer = current
        setattr(parent, child, layer)


def _adapter_layers(model: nn.Module, nara: bool) -> list[tuple[str, nn.Module]]:
    """(own name, layer) of the NaRA layers (``nara=True``) or the other peft adapter layers of ``model``."""
    return [
        (_own_name(n), m)
        for n, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and isinstance(m, NaRALayer) == nara
    ]


@contextlib.contextmanager
def keeping_nara(*models: Optional[nn.Module]) -> Iterator[None]:
    """Run a LoRA unload on ``models`` and leave their NaRA adapters exactly in place (see the module docstring).

    Raises:
        RuntimeError: the block left something unexpected where a NaRA layer was (nothing is guessed).
    """
    kept = []
    for model in models:
        tuner = inplace_tuner(model) if model is not None else None
        if tuner is not None:
            configs = {n: c for n, c in tuner.peft_config.items() if isinstance(c, NaRAConfig)}
            kept.append((model, tuner, _adapter_layers(model, nara=True), configs))
    try:
        yield
    finally:
        for model, tuner, layers, configs in kept:
            _reseat(model, layers, "NaRA adapter")
            # the tuner's peft_config is its own dict, or (NaRA attached after a LoRA) the model's, which diffusers
            # deleted: either way it holds NaRA's configs only again, also as model.peft_config
            own = tuner.__dict__.get("peft_config")
            if own is None:
                own = configs
            for name in [n for n in own if n not in configs]:
                del own[name]
            model.peft_config = own


@contextlib.contextmanager
def keeping_lora(model: nn.Module) -> Iterator[None]:
    """Run a NaRA unload (`nara_diffusion.core.remove_nara`) on ``model`` and leave its diffusers / peft LoRA layers
    exactly in place (peft's unload, like diffusers', replaces every adapter layer by its innermost base layer); NaRA's
    configs leave ``model.peft_config``."""
    layers = _adapter_layers(model, nara=False)
    shared = model.__dict__.get("peft_config")  # with a LoRA: the dict both filed their configs in
    try:
        yield
    finally:
        _reseat(model, layers, "LoRA")
        if layers and shared is not None:
            for name in [n for n, c in shared.items() if isinstance(c, NaRAConfig)]:
                del shared[name]
            model.peft_config = shared
