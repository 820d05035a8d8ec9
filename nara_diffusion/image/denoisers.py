"""The denoiser families NaRA knows: where a pipeline keeps its denoiser, what to adapt, and how λ is read.

Each family states how its ``forward``'s ``timestep`` argument encodes the noise level, so that λ ∈ [0, 1] is the
noise level of every example at every step, never a silent guess:

==========  ==========================  =====================================================================
family      denoiser                    λ from ``timestep`` (what the stock pipelines pass)
==========  ==========================  =====================================================================
``unet``    ``UNet2DConditionModel``    λ = t / T, T = ``scheduler.config.num_train_timesteps`` (t ∈ {0..T-1})
``sd3``     ``SD3Transformer2DModel``   λ = σ = timestep / T (the pipeline passes σ·T, T = 1000)
``flux``    ``FluxTransformer2DModel``  λ = σ = timestep (the pipeline passes σ; the model multiplies by 1000)
==========  ==========================  =====================================================================

Any other module whose ``forward`` takes ``timestep`` is refused unless the caller gives an explicit
``timestep_to_noise_level``. The family is found by class (subclasses included) and recorded in a saved adapter
(``nara_config.json`` field ``denoiser``), so loading knows the convention and refuses another architecture.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

#: The attention projections of every ``Attention`` (diffusers' own UNet LoRA targets).
ATTENTION_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
#: The context (text-stream) projections of the joint attention of MM-DiT blocks (SD3, Flux), where present.
JOINT_ATTENTION_TARGET_MODULES = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def sigma_from_timestep(timestep: torch.Tensor) -> torch.Tensor:
    """Flux's convention: the ``timestep`` a ``FluxTransformer2DModel`` receives is σ itself (``[B]`` or 0-d)."""
    return timestep.float()


@dataclass(frozen=True)
class DenoiserFamily:
    """How NaRA attaches to one kind of denoiser.

    Attributes:
        name: ``"unet"``, ``"sd3"`` or ``"flux"`` (recorded in saved adapters).
        component: The pipeline attribute holding the denoiser (``"unet"`` or ``"transformer"``).
        class_names: diffusers class names of the family (an instance of a subclass counts too).
        target_modules: Default NaRA targets.
        timestep_to_noise_level: None: λ = timestep / T (``noise_input="timestep"``); else the map to λ.
        convention: One line for messages and the saved config.
    """

    name: str
    component: str
    class_names: tuple[str, ...]
    target_modules: tuple[str, ...]
    timestep_to_noise_level: Optional[Any]
    convention: str


FAMILIES = (
    DenoiserFamily(
        "unet",
        "unet",
        ("UNet2DConditionModel",),
        tuple(ATTENTION_TARGET_MODULES),
        None,
        "lambda = timestep / num_train_timesteps",
    ),
    DenoiserFamily(
        "sd3",
        "transformer",
        ("SD3Transformer2DModel",),
        tuple(ATTENTION_TARGET_MODULES + JOINT_ATTENTION_TARGET_MODULES),
        None,
        "lambda = sigma = timestep / num_train_timesteps (the pipeline passes sigma * 1000)",
    ),
    DenoiserFamily(
        "flux",
        "transformer",
        ("FluxTransformer2DModel",),
        tuple(ATTENTION_TARGET_MODULES + JOINT_ATTENTION_TARGET_MODULES),
        sigma_from_timestep,
        "lambda = sigma = timestep (the pipeline passes sigma in [0, 1])",
    ),
)
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}
DENOISER_COMPONENTS = ("unet", "transformer")


def takes_timestep(model: nn.Module) -> bool:
    """Whether ``model.forward`` has a ``timestep`` parameter (a denoiser), i.e. whether λ can be read from calls."""
    return timestep_position(model) is not None


def timestep_position(model: nn.Module) -> Optional[int]:
    """Index of ``timestep`` among the positional arguments of ``model.forward`` (UNet: 1, SD3 / Flux: 3), or None
    when ``forward`` has no ``timestep``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "timestep" in positional:
        return positional.index("timestep")
    return None if all(p.name != "timestep" for p in params) else -1


def family_of(model: nn.Module) -> Optional[DenoiserFamily]:
    """The family of ``model`` by its class (or a base class), or None for a denoiser the library does not know."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if names & set(family.class_names):
            return family
    return None


def denoiser_of(pipe: Any) -> tuple[str, nn.Module]:
    """``(attribute, module)`` of a pipeline's denoiser: its ``unet`` or its ``transformer``.

    Raises:
        TypeError: the pipeline has neither.
    """
    for name in DENOISER_COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise TypeError(
        f"{type(pipe).__name__} has neither a unet nor a transformer; NaRA pipeline loading needs a diffusion "
        "pipeline whose denoiser is one of them."
    )


def unknown_denoiser_error(model: nn.Module) -> ValueError:
    """The error for a denoiser whose timestep convention the library does not know."""
    known = ", ".join(f"{n} ({f.convention})" for f in FAMILIES for n in f.class_names)
    return ValueError(
        f"NaRA does not know how {type(model).__name__} encodes the noise level in its timestep argument, so it "
        "cannot read λ from it. Pass timestep_to_noise_level= (a map from the timestep tensor to λ in [0, 1], "
        f"e.g. lambda t: t / 1000 or lambda sigma: sigma). Known denoisers: {known}."
    )
