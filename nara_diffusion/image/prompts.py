"""Prompt embeddings from NaRA text encoders, conditioned on the timestep of every denoising step.

A NaRA text encoder is trained with λ = the example's timestep, like the UNet. A diffusers pipeline, however,
encodes the prompt once, before the denoising loop, when there is no timestep yet. `PerStepPromptEncoding`
closes that gap without changing the pipeline's ``__call__``: it records the pipeline's ``encode_prompt`` call,
and a pre-hook on the denoiser (UNet, or SD3's transformer) re-runs that call at every step with the text encoders
at λ of the step's timestep (cached per timestep), then hands the denoiser those embeddings
(``encoder_hidden_states`` and the pooled embedding: SDXL's ``text_embeds``, SD3's ``pooled_projections``) in place
of the ones encoded before the loop. Classifier-free guidance is recognised from the batch: ``[negative,
positive]``, in the order every diffusers pipeline concatenates them. Flux's ``encode_prompt`` returns another
tuple (no negative; text ids), so Flux pipelines take NaRA-C text encoders only (the loader says so).

The first step checks that the embeddings the UNet received are exactly what the recorded call produced; a
pipeline that edits them in between (prompt weighting inside the pipeline, a custom pipeline) gets a clear error
rather than a silently wrong picture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from .._compat import restore_method, shadow_method
from ..core import noise_level
from ..core.tuner import inplace_tuner
from .denoisers import denoiser_of
from .unet import TimestepReader, needs_noise_level, unet_reader

#: Pipelines whose ``encode_prompt`` returns ``(embeds, negative, pooled, negative_pooled)``; per-step encoding
#: supports their denoisers' families.
PER_STEP_FAMILIES = ("unet", "sd3")
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")

_ATTR = "_nara_prompt_encoding"


def _stack(pos: Optional[torch.Tensor], neg: Optional[torch.Tensor], like: torch.Tensor, what: str) -> torch.Tensor:
    """``pos`` (no guidance) or ``[neg, pos]`` (guidance), chosen by the batch of ``like``, the tensor to replace."""
    if pos is None:
        raise RuntimeError(f"The pipeline's encode_prompt returned no {what}; NaRA text encoders cannot condition it.")
    if neg is not None and like.shape[0] == pos.shape[0] + neg.shape[0]:
        out = torch.cat([neg, pos])
    elif like.shape[0] == pos.shape[0]:
        out = pos
    else:
        raise RuntimeError(
            f"The UNet got {what} with batch {like.shape[0]}, but the prompt encodes to {pos.shape[0]} "
            "examples; per-step prompt encoding only supports pipelines that pass encode_prompt's output on."
        )
    return out.to(device=like.device, dtype=like.dtype)


class PerStepPromptEncoding:
    """Re-encodes a pipeline's prompt at every denoising step, with its NaRA text encoders at that step's λ.

    Install with `enable_per_step_prompt_encoding`; `disable_per_step_prompt_encoding` removes it.

    Args:
        pipe: A diffusers pipeline with a ``unet`` (or SD3's ``transformer``), ``encode_prompt`` and at least one
            NaRA text encoder.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        _, denoiser = denoiser_of(pipe)
        self.reader: TimestepReader = unet_reader(denoiser)
        self.hidden_position = 2 if self.reader.position == 1 else 1  # UNet (sample, t, hidden); DiT (x, hidden, …)
        self.call: Optional[tuple[tuple, dict]] = None
        self.first: Optional[tuple] = None
        self.cache: dict[float, tuple] = {}
        self.handle = denoiser.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        shadow_method(pipe, "encode_prompt", self._encode_prompt)  # the pipeline's __call__ now calls ours

    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders whose NaRA adapter needs λ."""
        found = [getattr(self.pipe, n, None) for n in TEXT_ENCODER_NAMES]
        return [te for te in found if te is not None and needs_noise_level(te)]

    @contextlib.contextmanager
    def _at(self, value: Any) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for te in self.text_encoders():
                stack.enter_context(noise_level(te, value))
            yield

    def _encode(self, value: Any) -> tuple:
        args, kwargs = self.call
        with self._at(value):
            return type(self.pipe).encode_prompt(self.pipe, *args, **kwargs)

    def _encode_prompt(self, *args: Any, **kwargs: Any) -> tuple:
        """Stands in for ``pipe.encode_prompt``: records the call, encodes at λ = 1 (replaced at every step)."""
        if not self.text_encoders():  # e.g. NaRA-C text encoders: nothing depends on the step
            self.call = self.first = None
            return type(self.pipe).encode_prompt(self.pipe, *args, **kwargs)
        if kwargs.get("prompt_embeds") is not None:
            raise ValueError(
                "This pipeline's text encoders carry NaRA adapters, which re-encode the prompt at every denoising "
                "step: pass prompt=..., not prompt_embeds=..."
            )
        self.call, self.cache = (args, kwargs), {}
        self.first = self._encode(self._highest_noise())
        return self.first

    def _highest_noise(self) -> float:
        """λ = 1 in the units the text encoders' adapters take (t = T, or λ itself under a custom map)."""
        tuner = inplace_tuner(self.text_encoders()[0])
        config = tuner.peft_config[tuner.active_adapters[0]]
        return float(config.num_train_timesteps) if config.noise_input == "timestep" else 1.0

    def _before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.call is None or not self.text_encoders():
            return args, kwargs
        position = self.reader.position
        timestep = torch.as_tensor(kwargs.get("timestep", args[position] if len(args) > position else None))
        flat = timestep.reshape(-1)
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError("Per-step prompt encoding needs one timestep per UNet call; got several.")
        key = float(flat[0])
        if key not in self.cache:
            self.cache[key] = self._encode(self.reader.value(flat[0]))
        encoded = self.cache[key]
        args, kwargs = list(args), dict(kwargs)
        at = self.hidden_position
        if "encoder_hidden_states" in kwargs:
            hidden = kwargs["encoder_hidden_states"]
        elif len(args) > at:
            hidden = args[at]
        else:
            raise RuntimeError("The denoiser was called without encoder_hidden_states; nothing to condition.")
        added = dict(kwargs.get("added_cond_kwargs") or {})
        pooled = len(encoded) >= 4 and "text_embeds" in added
        projections = len(encoded) >= 4 and kwargs.get("pooled_projections") is not None  # SD3
        if self.first is not None:  # once per pipeline call: did the denoiser get what encode_prompt returned?
            same = torch.equal(_stack(self.first[0], self.first[1], hidden, "prompt embeddings"), hidden)
            for used, given in ((pooled, added.get("text_embeds")), (projections, kwargs.get("pooled_projections"))):
                if used:
                    same = same and torch.equal(_stack(self.first[2], self.first[3], given, "x"), given)
            if not same:
                raise RuntimeError(
                    "The pipeline changed the prompt embeddings between encode_prompt and the UNet, so NaRA text "
                    "encoders cannot re-encode them per step; unload the text encoders' adapters for this pipeline."
                )
            self.first = None
        new_hidden = _stack(encoded[0], encoded[1], hidden, "prompt embeddings")
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = new_hidden
        else:
            args[at] = new_hidden
        if pooled:
            added["text_embeds"] = _stack(encoded[2], encoded[3], added["text_embeds"], "pooled prompt embeddings")
            kwargs["added_cond_kwargs"] = added
        if projections:
            given = kwargs["pooled_projections"]
            kwargs["pooled_projections"] = _stack(encoded[2], encoded[3], given, "pooled prompt embeddings")
        return tuple(args), kwargs

    def remove(self) -> None:
        """Give the pipeline its own ``encode_prompt`` back and drop the denoiser hook."""
        self.handle.remove()
        restore_method(self.pipe, "encode_prompt")


def enable_per_step_prompt_encoding(pipe: Any) -> PerStepPromptEncoding:
    """Make ``pipe`` re-encode its prompt at every step with its NaRA text encoders at that step's λ (idempotent)."""
    existing = pipe.__dict__.get(_ATTR)
    if existing is not None:
        return existing
    encoding = PerStepPromptEncoding(pipe)
    pipe.__dict__[_ATTR] = encoding
    return encoding


def disable_per_step_prompt_encoding(pipe: Any) -> None:
    """Undo `enable_per_step_prompt_encoding` (no-op when it is not enabled)."""
    encoding = pipe.__dict__.pop(_ATTR, None)
    if encoding is not None:
        encoding.remove()
