"""The forward process of masked-diffusion SFT: per-example noise level t, and which answer tokens are masked.

Each example draws t ~ U(ε, 1). Only the answer region (positions ≥ ``prompt_length``, EOS padding included) is
ever masked; the prompt stays clean. Two ways to pick the masked positions:

- ``"uniform"`` (default, as the NaRA authors do): exactly k = ⌈t · answer_len⌉ positions (clamped to
  [1, answer_len]), a uniformly random subset of the answer region.
- ``"bernoulli"`` (LLaDA's guidelines): every answer position is masked independently with probability t, so the
  count varies and may be zero.

The sampled t (not the realised mask fraction) is what a NaRA adapter receives as its noise level λ and what
the loss divides by. Everything is vectorised over the batch and drawn from an optional ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

MaskingMode = Literal["uniform", "bernoulli"]
MASKING_MODES: tuple[str, ...] = ("uniform", "bernoulli")
DEFAULT_EPS = 1e-3


@dataclass(frozen=True)
class MaskedBatch:
    """The result of the forward process on a batch of ``B`` sequences of length ``L``.

    Attributes:
        noisy_ids: ``[B, L]`` long; the input with masked positions replaced by the mask token.
        masked: ``[B, L]`` bool; True where a token was masked (only ever in the answer region).
        t: ``[B]`` float32; the sampled noise level of each example, in [ε, 1). A NaRA adapter gets it as λ.
        answer_lengths: ``[B]`` long; ``L - prompt_length``, the answer tokens plus the EOS padding.
    """

    noisy_ids: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor
    answer_lengths: torch.Tensor

    @property
    def num_masked(self) -> torch.Tensor:
        """``[B]`` long: how many positions of each example are masked."""
        return self.masked.sum(dim=1)


def answer_region(prompt_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, L]`` bool: True at positions ≥ the example's prompt length (answer and EOS padding).

    Args:
        prompt_lengths: ``[B]`` integer tensor.
        seq_len: ``L``.
    """
    positions = torch.arange(seq_len, device=prompt_lengths.device)
    return positions.unsqueeze(0) >= prompt_lengths.unsqueeze(1)


def uniform(
    shape: tuple[int, ...],
    generator: Optional[torch.Generator],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """U[0, 1) samples drawn on the generator's device (a generator only serves its own device), then moved."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=dtype).to(device)


def sample_t(
    batch_size: int,
    *,
    eps: float = DEFAULT_EPS,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str] = "cpu",
) -> torch.Tensor:
    """Draw one noise level per example, t ~ U(ε, 1), as ``[B]`` float32 in [ε, 1).

    Computed as ε + (1 − ε)·u with u ~ U[0, 1), LLaDA's ``p_mask``; done in float64 so that t never rounds up to 1.
    """
    _check_eps(eps)
    u = uniform((batch_size,), generator, torch.device(device), dtype=torch.float64)
    return (eps + (1.0 - eps) * u).float()


def mask_answers(
    input_ids: torch.Tensor,
    prompt_lengths: Union[torch.Tensor, list[int]],
    *,
    mask_token_id: int,
    mode: MaskingMode = "uniform",
    eps: float = DEFAULT_EPS,
    t: Optional[Union[torch.Tensor, float]] = None,
    generator: Optional[torch.Generator] = None,
) -> MaskedBatch:
    """Run the forward process: sample t per example and mask part of each answer region.

    Args:
        input_ids: ``[B, L]`` clean token ids x0 (prompt, answer, one EOS, EOS padding).
        prompt_lengths: ``[B]`` number of prompt tokens of each example; each must be < ``L`` so that every example
            has at least one answer position.
        mask_token_id: The model's mask token (``model.config.mask_token_id``).
        mode: ``"uniform"`` (exactly ⌈t·answer_len⌉ masked, clamped to [1, answer_len]) or ``"bernoulli"``
            (each answer token masked with probability t).
        eps: Lower end of t's range, in (0, 1); keeps the 1/t loss weight finite.
        t: Use these noise levels (a float or ``[B]``, each in (0, 1]) instead of sampling, e.g. for a loss
            profile over fixed noise levels.
        generator: Random source for t and the positions (on any device); the default RNG when None.

    Returns:
        A `MaskedBatch` on ``input_ids``'s device.

    Raises:
        ValueError: bad shapes, a prompt that leaves no answer position, an unknown mode, or ε / t out of range.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, L], got {tuple(input_ids.shape)}.")
    if mode not in MASKING_MODES:
        raise ValueError(f"Unknown masking mode {mode!r}; use one of {MASKING_MODES}.")
    batch, seq_len = input_ids.shape
    device = input_ids.device
    prompts = _check_prompt_lengths(prompt_lengths, batch, seq_len, device)
    t = sample_t(batch, eps=eps, generator=generator, device=device) if t is None else _check_t(t, batch, device)
    region = answer_region(prompts, seq_len)
    answer_lengths = seq_len - prompts
    if mode == "uniform":
        masked = _mask_exactly(region, num_to_mask(t, answer_lengths), generator)
    else:
        masked = region & (uniform((batch, seq_len), generator, device) < t.unsqueeze(1))
    noisy = input_ids.masked_fill(masked, mask_token_id)
    return MaskedBatch(noisy_ids=noisy, masked=masked, t=t, answer_lengths=answer_lengths)


def num_to_mask(t: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """k = ⌈t · answer_len⌉ clamped to [1, answer_len], as ``[B]`` long (the product is taken in float64)."""
    k = torch.ceil(t.double() * answer_lengths.double()).long()
    return torch.minimum(k.clamp_min(1), answer_lengths)


def _mask_exactly(region: torch.Tensor, k: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Mask a uniformly random subset of exactly ``k[b]`` positions inside ``region[b]`` for every row.

    Random scores, with positions outside the region pushed past every score inside it; a position is masked when
    its rank within its row is below k. Ranks of i.i.d. scores form a uniform permutation, so the chosen set is a
    uniform k-subset of the region.

    Args:
        region: ``[B, L]`` bool.
        k: ``[B]`` long, each ≤ the row's region size.
    """
    batch, seq_len = region.shape
    scores = uniform((batch, seq_len), generator, region.device).masked_fill(~region, 2.0)
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(seq_len, device=region.device).expand(batch, seq_len))
    return ranks < k.unsqueeze(1)


def _check_eps(eps: float) -> None:
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be in (0, 1) so that t ~ U(eps, 1) keeps 1/t finite, got {eps}.")


def _check_prompt_lengths(
    prompt_lengths: Union[torch.Tensor, list[int]], batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    prompts = torch.as_tensor(prompt_lengths, device=device)
    if prompts.is_floating_point() or prompts.dtype == torch.bool or prompts.shape != (batch,):
        raise ValueError(
            f"prompt_lengths must be integers of shape [{batch}] (one per example), got dtype {prompts.dtype} "
            f"and shape {tuple(prompts.shape)}."
        )
    prompts = prompts.long()
    if bool(((prompts < 0) | (prompts >= seq_len)).any()):
        raise ValueError(
            f"Every prompt length must be in [0, {seq_len - 1}] so the answer region is not empty (sequence length "
            f"{seq_len}), got {prompts.tolist()}. Pad examples with at least one EOS after the answer."
        )
    return prompts


def _check_t(t: Union[torch.Tensor, float], batch: int, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(t, dtype=torch.float32, device=device)
    if tensor.dim() == 0:
        tensor = tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(f"t must be a float or have shape [{batch}], got shape {tuple(tensor.shape)}.")
    if not bool(((tensor > 0) & (tensor <= 1)).all()):
        raise ValueError(f"t must be in (0, 1] (the loss divides by it), got {tensor.tolist()}.")
    return tensor.contiguous()
