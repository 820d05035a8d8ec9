"""NaRA on diffusers UNets (and their CLIP text encoders), with λ read from the diffusion timestep of every call.

``nd.image.inject_nara(unet, config, scheduler=pipe.scheduler)`` is ``nd.inject_nara`` with the image defaults filled
in (targets, T from the scheduler, the timestep reader as ``noise_level_fn``): it attaches NaRA in place, as
``unet.add_adapter(lora_config)`` does for LoRA: the attention
projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every ``Attention``, the modules diffusers' own LoRA
targets) become `NaRALinear` layers; the attention processors are not touched, so SDPA, xformers or a custom
processor keep working. A forward pre-hook reads the ``timestep`` argument of ``UNet2DConditionModel.forward``
(``[B]`` or a scalar, which broadcasts) and gives the adapter λ = t / num_train_timesteps per example, so an
unmodified pipeline call conditions every denoising step, with or without classifier-free guidance.

On a text encoder (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) λ is the same timestep, but a text encoder
never sees it: training code passes it with ``nd.noise_level(text_encoder, timesteps)``, and pipelines re-encode
the prompt at every denoising step (`nara_diffusion.image.prompts`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core import NaRAConfig, NoiseLevelError
from ..core import inject_nara as _core_inject_nara
from ..core.tuner import inplace_tuner

#: diffusers' own LoRA targets on a UNet: the projections of every attention block.
UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
#: The attention projections of a CLIP text encoder (diffusers' ``--train_text_encoder`` LoRA targets).
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]

#: Maps the ``timestep`` a UNet receives (a ``[B]`` or 0-d tensor) to λ ∈ [0, 1], e.g. for flow-matching sigmas.
TimestepMap = Callable[[torch.Tensor], torch.Tensor]


def takes_timestep(model: nn.Module) -> bool:
    """Whether ``model.forward`` has a ``timestep`` parameter (a UNet), i.e. whether λ can be read from its calls."""
    try:
        return "timestep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class TimestepReader:
    """Reads the diffusion timestep of a UNet call and turns it into what the NaRA core expects.

    With no ``timestep_to_noise_level`` the timestep itself is returned and the core divides by the config's
    ``num_train_timesteps`` (``noise_input="timestep"``, validated in [0, T]); with one, the mapped λ ∈ [0, 1] is
    returned (the adapter then has ``noise_input="noise_level"``: λ given directly).

    Args:
        timestep_to_noise_level: Optional map from the UNet's ``timestep`` argument to λ.
    """

    def __init__(self, timestep_to_noise_level: Optional[TimestepMap] = None) -> None:
        self.timestep_to_noise_level = timestep_to_noise_level

    def value(self, timestep: Union[torch.Tensor, float, int]) -> Union[torch.Tensor, float, int]:
        """What the core gets for ``timestep``: the timestep itself, or the mapped λ."""
        if self.timestep_to_noise_level is None:
            return timestep
        return self.timestep_to_noise_level(torch.as_tensor(timestep))

    def __call__(self, args: tuple, kwargs: dict) -> Union[torch.Tensor, float, int]:
        """The ``noise_level_fn`` of the UNet's pre-hook: ``forward(sample, timestep, ...)``."""
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:
            raise NoiseLevelError(
                "The NaRA UNet was called without a timestep; call it as unet(sample, timestep, ...) as the "
                "diffusers pipelines do."
            )
        return self.value(timestep)


def unet_reader(unet: nn.Module) -> TimestepReader:
    """The `TimestepReader` that conditions ``unet`` (attached by `inject_nara`)."""
    tuner = inplace_tuner(unet)
    reader = getattr(tuner, "noise_level_fn", None)
    if not isinstance(reader, TimestepReader):
        raise ValueError("This UNet carries no NaRA adapter attached with nd.image.inject_nara.")
    return reader


def prepare_config(
    model: nn.Module,
    config: NaRAConfig,
    *,
    scheduler: Any = None,
    num_train_timesteps: Optional[int] = None,
    timestep_to_noise_level: Optional[TimestepMap] = None,
) -> NaRAConfig:
    """A copy of ``config`` ready for ``model``: default targets, how λ is given, and T from the scheduler.

    Args:
        model: A UNet (its forward takes ``timestep``) or a CLIP text encoder.
        config: The adapter configuration; ``target_modules=None`` picks `UNET_TARGET_MODULES` or
            `TEXT_ENCODER_TARGET_MODULES`.
        scheduler: A diffusers scheduler; its ``config.num_train_timesteps`` becomes T.
        num_train_timesteps: T given directly (when there is no scheduler at hand).
        timestep_to_noise_level: A custom map from the timestep to λ (then ``noise_input="noise_level"``).
    """
    changes: dict[str, Any] = {}
    if config.target_modules is None:
        changes["target_modules"] = UNET_TARGET_MODULES if takes_timestep(model) else TEXT_ENCODER_TARGET_MODULES
    if scheduler is not None:
        scheduler_t = int(scheduler.config.num_train_timesteps)
        if num_train_timesteps is not None and num_train_timesteps != scheduler_t:
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps} disagrees with the scheduler's {scheduler_t}; pass one."
            )
        num_train_timesteps = scheduler_t
    if num_train_timesteps is not None:
        changes["num_train_timesteps"] = int(num_train_timesteps)
    changes["noise_input"] = "timestep" if timestep_to_noise_level is None else "noise_level"
    return dataclasses.replace(config, **changes)


def inject_nara(
    model: nn.Module,
    config: NaRAConfig,
    adapter_name: str = "default",
    *,
    scheduler: Any = None,
    num_train_timesteps: Optional[int] = None,
    timestep_to_noise_level: Optional[TimestepMap] = None,
) -> nn.Module:
    """Attach NaRA to a diffusers UNet (or a CLIP text encoder) in place and return it: ``nd.inject_nara`` with the
    image defaults (targets, ``noise_input``, T) filled into ``config`` and, on a UNet, a `TimestepReader` as its
    ``noise_level_fn``. ``nd.remove_nara(model)`` undoes it.

    On a UNet (any module whose ``forward`` takes ``timestep``, e.g. ``UNet2DConditionModel``), every call is
    conditioned on its own timestep: λ = timestep / T per example (a scalar timestep broadcasts to the batch),
    with T = ``scheduler.config.num_train_timesteps`` (or ``num_train_timesteps``, or the config's). A text
    encoder gets the same kind of adapter, whose λ the caller gives with ``nd.noise_level(text_encoder, t)``.

    Args:
        model: ``UNet2DConditionModel`` (SDXL, SD 1.5, SD 2.x, ...) or ``CLIPTextModel(WithProjection)``.
        config: The adapter configuration. ``target_modules=None``: ``to_q, to_k, to_v, to_out.0`` on a UNet,
            ``q_proj, k_proj, v_proj, out_proj`` on a text encoder. ``noise_input`` is set for you.
        adapter_name: Name of the adapter (a second call with another name adds a second adapter).
        scheduler: The pipeline's scheduler, whose ``num_train_timesteps`` is T.
        num_train_timesteps: T, when no scheduler is given.
        timestep_to_noise_level: Optional map from the ``timestep`` the UNet receives to λ ∈ [0, 1] (e.g.
            ``lambda sigma: sigma`` for flow-matching sigmas); the same map must be given when loading.

    Returns:
        ``model``, adapted in place: its NaRA layers and ``model.nara_hypernet`` are part of its parameters and
        state dict; every other parameter is frozen. ``nd.remove_nara`` restores it.

    Raises:
        ValueError: ``target_modules`` match nothing, or ``adapter_name`` is taken.
    """
    config = prepare_config(
        model,
        config,
        scheduler=scheduler,
        num_train_timesteps=num_train_timesteps,
        timestep_to_noise_level=timestep_to_noise_level,
    )
    if takes_timestep(model):
        tuner = inplace_tuner(model)
        previous = getattr(tuner, "noise_level_fn", None)
        if isinstance(previous, TimestepReader) and (previous.timestep_to_noise_level is not timestep_to_noise_level):
            raise ValueError(
                "All NaRA adapters of one UNet read the timestep the same way; this one was given another "
                "timestep_to_noise_level than the adapter already attached."
            )
        reader = TimestepReader(timestep_to_noise_level)
        return _core_inject_nara(model, config, adapter_name, noise_level_fn=reader)
    return _core_inject_nara(model, config, adapter_name)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the NaRA adapters ``model`` carries (empty when none)."""
    tuner = inplace_tuner(model)
    return [] if tuner is None else list(tuner.nara_hypernet)


def needs_noise_level(model: nn.Module) -> bool:
    """Whether an active NaRA adapter of ``model`` is conditioned on λ (core ``"noise"``)."""
    tuner = inplace_tuner(model)
    if tuner is None:
        return False
    return any(tuner.nara_hypernet[n].needs_noise_level for n in tuner.active_adapters if n in tuner.nara_hypernet)
