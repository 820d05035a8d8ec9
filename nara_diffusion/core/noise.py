"""Noise levels λ: validation at the boundary and conversion from mask ratios and diffusion timesteps.

λ is one number per example in [0, 1]: a sequence's mask ratio for text, the normalised timestep
t / num_train_timesteps for images. Every function here returns a float32 tensor of shape ``[B]``
(``[1]`` for a scalar, which broadcasts over the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch


class NoiseLevelError(ValueError):
    """A noise level that is missing, out of range, not finite, or of the wrong shape."""


@dataclass(frozen=True)
class ComputedNoiseLevel:
    """λ that the library computed itself and that lies in range by construction.

    Two kinds of λ reach the model. **Given** λ (whatever a caller passes as ``noise_level=``, to
    `noise_level`, to `NoiseConditionedAdapter.core`, or a UNet's ``timestep`` from a pipeline) is always checked,
    on accelerators too: there the check synchronises with the host once per forward, so that a bad value raises a
    Python `NoiseLevelError` instead of a device-side assert that leaves the CUDA context unusable. **Computed** λ
    (a realised mask fraction in the sampler, a sampled t in training) is wrapped in this class by the code that
    computes it: its shape is still checked, its range is checked on the CPU (where that costs nothing) and not on
    accelerators, so the sampling and training loops never wait for the host.

    Attributes:
        values: ``[B]`` (or ``[1]``/0-d) tensor in [0, 1] (or in [0, T] for a timestep).
    """

    values: torch.Tensor


NoiseLevelLike = Union[float, int, Sequence[float], torch.Tensor, ComputedNoiseLevel]


def _as_vector(value: NoiseLevelLike, name: str) -> torch.Tensor:
    """``value`` as a float32 vector on the device it came on (CPU for Python numbers), shape checked."""
    if isinstance(value, bool) or value is None:
        raise NoiseLevelError(f"{name} must be a number or a tensor, got {value!r}.")
    if torch.is_tensor(value):
        if value.is_complex() or value.dtype == torch.bool:
            raise NoiseLevelError(f"{name} must be a real floating or integer tensor, got dtype {value.dtype}.")
        if value.device.type == "meta":
            raise NoiseLevelError(
                f"{name} is a meta tensor, which holds no values; pass a tensor on the CPU or the model's device."
            )
        tensor = value.to(dtype=torch.float32)
    else:
        try:
            tensor = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise NoiseLevelError(f"{name} must be a number or a tensor, got {value!r}.") from err
    if tensor.dim() == 0:
        return tensor.reshape(1)
    if tensor.dim() != 1:
        raise NoiseLevelError(
            f"{name} must be a scalar or a 1-D tensor with one value per example, got shape {tuple(tensor.shape)}."
        )
    if tensor.numel() == 0:
        raise NoiseLevelError(f"{name} is empty; give one value per example or a scalar.")
    return tensor


def _check_batch(tensor: torch.Tensor, batch_size: Optional[int], name: str) -> None:
    if batch_size is not None and tensor.numel() not in (1, batch_size):
        raise NoiseLevelError(
            f"{name} has {tensor.numel()} values but the batch has {batch_size} examples; "
            "pass a scalar or a tensor of shape [batch_size]."
        )


def _check_range(tensor: torch.Tensor, high: float, name: str, computed: bool) -> None:
    if computed and tensor.device.type != "cpu":
        return  # in range by construction (see ComputedNoiseLevel); checking would stall every step on the host
    if tensor.device.type == "cpu" and tensor.numel() <= 4096:
        # A batch's worth of values: reading them once and comparing in Python costs a few µs; four tensor ops cost
        # ~60 µs, which is ~1 % of a small model's decoding step. NaN fails both comparisons.
        if all(0.0 <= v <= high for v in tensor.tolist()):
            return
    ok = torch.isfinite(tensor) & (tensor >= 0) & (tensor <= high)
    if not bool(ok.all()):  # on an accelerator: one host sync, so that the error is a Python exception
        bad = tensor[~ok][:4].tolist()
        raise NoiseLevelError(f"{name} must be finite and in [0, {high:g}], got values such as {bad}.")


def _checked(
    value: NoiseLevelLike, high: float, name: str, batch_size: Optional[int], device: Optional[torch.device]
) -> torch.Tensor:
    computed = isinstance(value, ComputedNoiseLevel)
    tensor = _as_vector(value.values if computed else value, name)
    _check_batch(tensor, batch_size, name)
    _check_range(tensor, high, name, computed)  # where the values are: a CPU value is checked before any copy
    return tensor if device is None else tensor.to(device)


def validate_noise_level(
    value: NoiseLevelLike, *, batch_size: Optional[int] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Check a normalised noise level λ and return it as a float32 tensor of shape ``[B]`` or ``[1]``.

    Args:
        value: A float, a 0-d tensor, or a ``[B]`` tensor (or sequence) of values in [0, 1].
        batch_size: If given, a vector must have exactly this many values.
        device: Device of the returned tensor (default: the input's, or CPU for Python numbers).

    Raises:
        NoiseLevelError: NaN/inf, values outside [0, 1], or a shape that is neither scalar nor ``[batch_size]``.
    """
    return _checked(value, 1.0, "noise_level", batch_size, device)


def timestep_to_noise_level(
    timestep: NoiseLevelLike,
    num_train_timesteps: int,
    *,
    batch_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Normalise diffusion timesteps t ∈ [0, num_train_timesteps] to λ = t / num_train_timesteps, shape ``[B]``."""
    return _checked(timestep, float(num_train_timesteps), "timestep", batch_size, device) / float(num_train_timesteps)


def noise_level_from_mask(is_masked: torch.Tensor, region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Realised mask ratio per example: masked positions / positions in ``region``.

    Args:
        is_masked: ``[B, L]`` bool tensor, True where the token is the mask token.
        region: Optional ``[B, L]`` bool tensor of the positions that count (e.g. the answer or generation
            region); ``None`` counts the whole sequence.

    Returns:
        ``[B]`` float32 tensor in [0, 1]. Computed on the device without host synchronisation.
    """
    if is_masked.dim() != 2:
        raise NoiseLevelError(f"is_masked must have shape [B, L], got {tuple(is_masked.shape)}.")
    masked = is_masked.bool()
    if region is None:
        return masked.float().mean(dim=1)
    if region.shape != is_masked.shape:
        raise NoiseLevelError(
            f"region has shape {tuple(region.shape)} but is_masked has shape {tuple(is_masked.shape)}."
        )
    region = region.bool()
    counted = (masked & region).sum(dim=1).float()
    return counted / region.sum(dim=1).clamp_min(1).float()


def to_noise_level(
    value: NoiseLevelLike,
    noise_input: str,
    num_train_timesteps: int,
    *,
    batch_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Turn what a caller passed (a mask ratio or a timestep, per ``noise_input``) into a validated λ ``[B]``."""
    if noise_input == "timestep":
        return timestep_to_noise_level(value, num_train_timesteps, batch_size=batch_size, device=device)
    return validate_noise_level(value, batch_size=batch_size, device=device)
