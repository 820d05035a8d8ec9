"""NaRA on diffusers denoisers (UNets, SD3 and Flux transformers) and their text encoders, with λ read from the
diffusion timestep of every call.

``nd.image.inject_nara(denoiser, config, scheduler=pipe.scheduler)`` is ``nd.inject_nara`` with the image defaults
filled in (targets, T from the scheduler, the timestep reader as ``noise_level_fn``): it attaches NaRA in place, as
``unet.add_adapter(lora_config)`` does for LoRA: the attention projections (``to_q``, ``to_k``, ``to_v``,
``to_out.0`` of every ``Attention``, the modules diffusers' own LoRA targets; on SD3 / Flux also the joint-attention
context projections ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``) become `NaRALinear` layers; the
attention processors are not touched, so SDPA, xformers or a custom processor keep working. A forward pre-hook reads
the ``timestep`` argument of the denoiser's ``forward`` (``[B]`` or a scalar, which broadcasts) and gives the adapter
λ per example by the family's convention (`nara_diffusion.image.denoisers`: a UNet λ = t/T, SD3 and Flux λ = σ), so
an unmodified pipeline call conditions every denoising step, with or without classifier-free guidance.

On a text encoder (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) λ is the same timestep, but a text encoder
never sees it: training code passes it with ``nd.noise_level(text_encoder, timesteps)``, and pipelines re-encode
the prompt at every denoising step (`nara_diffusion.image.prompts`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core import NaRAConfig, NoiseLevelError
from ..core import inject_nara as _core_inject_nara
from ..core.tuner import inplace_tuner
from .denoisers import ATTENTION_TARGET_MODULES, family_of, timestep_position, unknown_denoiser_error
from .denoisers import takes_timestep as takes_timestep

#: diffusers' own LoRA targets on a UNet: the projections of every attention block.
UNET_TARGET_MODULES = list(ATTENTION_TARGET_MODULES)
#: The attention projections of a CLIP text encoder (diffusers' ``--train_text_encoder`` LoRA targets).
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: The attention projections of a T5 encoder (SD3's ``text_encoder_3``, Flux's ``text_encoder_2``).
T5_TARGET_MODULES = ["q", "k", "v", "o"]

#: Maps the ``timestep`` a UNet receives (a ``[B]`` or 0-d tensor) to λ ∈ [0, 1], e.g. for flow-matching sigmas.
TimestepMap = Callable[[torch.Tensor], torch.Tensor]


class TimestepReader:
    """Reads the diffusion timestep of a UNet call and turns it into what the NaRA core expects.

    With no ``timestep_to_noise_level`` the timestep itself is returned and the core divides by the config's
    ``num_train_timesteps`` (``noise_input="timestep"``, validated in [0, T]); with one, the mapped λ ∈ [0, 1] is
    returned (the adapter then has ``noise_input="noise_level"``: λ given directly).

    Args:
        timestep_to_noise_level: Optional map from the denoiser's ``timestep`` argument to λ.
        position: Index of ``timestep`` among the positional arguments of ``forward`` (UNet: 1, SD3 / Flux: 3).
    """

    def __init__(self, timestep_to_noise_level: Optional[TimestepMap] = None, position: int = 1) -> None:
        self.timestep_to_noise_level = timestep_to_noise_level
        self.position = position

    def value(self, timestep: Union[torch.Tensor, float, int]) -> Union[torch.Tensor, float, int]:
        """What the core gets for ``timestep``: the timestep itself, or the mapped λ."""
        if self.timestep_to_noise_level is None:
            return timestep
        return self.timestep_to_noise_level(torch.as_tensor(timestep))

    def __call__(self, args: tuple, kwargs: dict) -> Union[torch.Tensor, float, int]:
        """The ``noise_level_fn`` of the denoiser's pre-hook: ``forward(sample, timestep, ...)`` (UNet) or
        ``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)`` (SD3, Flux)."""
        timestep = kwargs.get("timestep")
        if timestep is None and 0 <= self.position < len(args):
            timestep = args[self.position]
        if timestep is None:
            raise NoiseLevelError(
                "The NaRA denoiser was called without a timestep; call it with its timestep as the diffusers "
                "pipelines do (unet(sample, timestep, ...), transformer(..., timestep=t, ...))."
            )
        return self.value(timestep)


def unet_reader(unet: nn.Module) -> TimestepReader:
    """The `TimestepReader` that conditions ``unet`` (attached by `inject_nara`)."""
    tuner = inplace_tuner(unet)
    reader = getattr(tuner, "noise_level_fn", None)
    if not isinstance(reader, TimestepReader):
        raise ValueError(f"This {type(unet).__name__} carries no NaRA adapter attached with nd.image.inject_nara.")
    return reader


def default_targets(model: nn.Module) -> list[str]:
    """The default NaRA targets of ``model``: its denoiser family's (attention projections, joint-attention context
    projections on SD3 / Flux), a T5 encoder's attention (``q, k, v, o``), or a CLIP encoder's."""
    family = family_of(model)
    if family is not None:
        return list(family.target_modules)
    if takes_timestep(model):
        return list(ATTENTION_TARGET_MODULES)
    if "T5" in type(model).__name__:
        return list(T5_TARGET_MODULES)
    return list(TEXT_ENCODER_TARGET_MODULES)


def resolve_timestep_map(model: nn.Module, timestep_to_noise_level: Optional[TimestepMap]) -> Optional[TimestepMap]:
    """The timestep → λ map of a denoiser: the caller's, else its family's (None: λ = t/T).

    Raises:
        ValueError: a denoiser of no known family and no map given (`denoisers.unknown_denoiser_error`).
    """
    if timestep_to_noise_level is not None or not takes_timestep(model):
        return timestep_to_noise_level
    family = family_of(model)
    if family is None:
        raise unknown_denoiser_error(model)
    return family.timestep_to_noise_level


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
        model: A denoiser (its forward takes ``timestep``) or a text encoder.
        config: The adapter configuration; ``target_modules=None`` picks `default_targets`.
        scheduler: A diffusers scheduler; its ``config.num_train_timesteps`` becomes T.
        num_train_timesteps: T given directly (when there is no scheduler at hand).
        timestep_to_noise_level: The map from the timestep to λ (then ``noise_input="noise_level"``), already
            resolved with `resolve_timestep_map` for a denoiser.
    """
    changes: dict[str, Any] = {}
    if config.target_modules is None:
        changes["target_modules"] = default_targets(model)
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
    """Attach NaRA to a diffusers denoiser (UNet, SD3 or Flux transformer) or a text encoder in place and return it:
    ``nd.inject_nara`` with the image defaults (targets, ``noise_input``, T) filled into ``config`` and, on a
    denoiser, a `TimestepReader` as its ``noise_level_fn``. ``nd.remove_nara(model)`` undoes it.

    On a denoiser every call is conditioned on its own timestep, per example (a scalar timestep broadcasts to the
    batch), by its family's convention (`nara_diffusion.image.denoisers`): a UNet λ = timestep / T with
    T = ``scheduler.config.num_train_timesteps`` (or ``num_train_timesteps``, or the config's); SD3 λ = σ =
    timestep / T; Flux λ = σ = timestep. A text encoder gets the same kind of adapter, whose λ the caller gives with
    ``nd.noise_level(text_encoder, value)`` in the units of the denoiser's adapter.

    Args:
        model: ``UNet2DConditionModel`` (SDXL, SD 1.5, SD 2.x, ...), ``SD3Transformer2DModel``,
            ``FluxTransformer2DModel``, another denoiser with ``timestep_to_noise_level``, or a text encoder
            (CLIP, T5).
        config: The adapter configuration. ``target_modules=None``: ``to_q, to_k, to_v, to_out.0`` (and on SD3 /
            Flux ``add_q_proj, add_k_proj, add_v_proj, to_add_out``) on a denoiser, ``q_proj, k_proj, v_proj,
            out_proj`` on a CLIP text encoder, ``q, k, v, o`` on T5. ``noise_input`` is set for you.
        adapter_name: Name of the adapter (a second call with another name adds a second adapter).
        scheduler: The pipeline's scheduler, whose ``num_train_timesteps`` is T.
        num_train_timesteps: T, when no scheduler is given.
        timestep_to_noise_level: A map from the ``timestep`` the denoiser receives to λ ∈ [0, 1], for a denoiser
            whose convention the library does not know (required there); the same map must be given when loading.

    Returns:
        ``model``, adapted in place: its NaRA layers and ``model.nara_hypernet`` are part of its parameters and
        state dict; every other parameter is frozen. ``nd.remove_nara`` restores it.

    Raises:
        ValueError: an unknown denoiser without ``timestep_to_noise_level``, ``target_modules`` match nothing, or
            ``adapter_name`` is taken.
    """
    timestep_to_noise_level = resolve_timestep_map(model, timestep_to_noise_level)
    config = prepare_config(
        model,
        config,
        scheduler=scheduler,
        num_train_timesteps=num_train_timesteps,
        timestep_to_noise_level=timestep_to_noise_level,
    )
    position = timestep_position(model)
    if position is not None:
        tuner = inplace_tuner(model)
        previous = getattr(tuner, "noise_level_fn", None)
        if isinstance(previous, TimestepReader) and (previous.timestep_to_noise_level is not timestep_to_noise_level):
            raise ValueError(
                f"All NaRA adapters of one {type(model).__name__} read the timestep the same way; this one was given "
                "another timestep_to_noise_level than the adapter already attached."
            )
        reader = TimestepReader(timestep_to_noise_level, position)
        return _core_inject_nara(model, config, adapter_name, noise_level_fn=reader)
    return _core_inject_nara(model, config, adapter_name)


def checkpoint_text_encoders(encoders: Iterable[nn.Module]) -> None:
    """Turn on (non-reentrant) activation checkpointing in each trained text encoder."""
    for encoder in encoders:
        if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
