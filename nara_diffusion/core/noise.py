"""Noise levels λ: validation at the boundary and conversion from mask ratios and diffusion timesteps.

λ is one number per example in [0, 1]: a sequence's mask ratio for text, the normalised timestep
t / num_train_timesteps for images. Every function here returns a float32 tensor of shape ``[B]``
(``[1]`` for a scalar, which broadcasts over the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

NoiseLevelLike = Union[float, int, Sequence[float], torch.Tensor]


class NoiseLevelError(ValueError):
    """A noise level that is missing, out of range, not finite, or of the wrong shape."""


def _as_vector(value: NoiseLevelLike, name: str, device: Optional[torch.device]) -> torch.Tensor:
    if isinstance(value, bool) or value is None:
        raise NoiseLevelError(f"{name} must be a number or a tensor, got {value!r}.")
    if torch.is_tensor(value):
        if value.is_complex() or value.dtype == torch.bool:
            raise NoiseLevelError(f"{name} must be a real floating or integer tensor, got dtype {value.dtype}.")
        tensor = value.to(device=device if device is not None else value.device, dtype=torch.float32)
    else:
        try:
            tensor = torch.as_tensor(value, dtype=torch.float32, device=device)
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


def _check_range(tensor: torch.Tensor, high: float, name: str) -> None:
    ok = torch.isfinite(tensor) & (tensor >= 0) & (tensor <= high)
    if tensor.device.type != "cpu":
        # No host sync on accelerators (it would stall every sampling step): the check runs on the device and
        # fails the next synchronising call with this message.
        torch._assert_async(ok.all(), f"{name} must be finite and in [0, {high:g}]")
        return
    if not bool(ok.all()):
        bad = tensor[~ok][:4].tolist()
        raise NoiseLevelError(f"{name} must be finite and in [0, {high:g}], got values such as {bad}.")


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
    tensor = _as_vector(value, "noise_level", device)
    _check_batch(tensor, batch_size, "noise_level")
    _check_range(tensor, 1.0, "noise_level")
    return tensor


def timestep_to_noise_level(
    timestep: NoiseLevelLike,
    num_train_timesteps: int,
    *,
    batch_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Normalise diffusion timesteps t ∈ [0, num_train_timesteps] to λ = t / num_train_timesteps, shape ``[B]``."""
    tensor = _as_vector(timestep, "timestep", device)
    _check_batch(tensor, batch_size, "timestep")
    _check_range(tensor, float(num_train_timesteps), "timestep")
    return tensor / float(num_train_timesteps)


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
