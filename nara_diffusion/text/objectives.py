"""The masked-diffusion SFT objective (LLaDA's ELBO) and the forward pass that feeds it.

For a batch of B examples with clean tokens x0, masked positions M_b, noise levels t_b and answer lengths n_b
(answer tokens plus EOS padding):

    loss = (1/B) · Σ_b  Σ_{i ∈ M_b} CE(logits_{b,i}, x0_{b,i}) / t_b / n_b

`masked_diffusion_loss` is that formula on tensors; `sft_loss` runs the whole step: mask the answers, call the model
(with ``noise_level=t`` when it carries a NaRA adapter, asking for logits at the masked positions only when the
model supports it), and compute the loss. It works the same for a NaRA PeftModel, a peft LoRA PeftModel and a
bare model being fully fine-tuned.
"""

from __future__ import annotations

import inspect
from typing import Literal, NamedTuple, Optional, Union

import peft
import torch
import torch.nn.functional as F
from torch import nn

from nara_diffusion.core.tuner import NaRAModel

from .masking import DEFAULT_EPS, MaskedBatch, MaskingMode, mask_answers

# Wrappers that keep the real model under ``.module`` (matched by name so torch.distributed is never imported).
_PARALLEL_WRAPPERS = ("DataParallel", "DistributedDataParallel", "FullyShardedDataParallel")


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    """Strip data-parallel wrappers and ``torch.compile``'s ``OptimizedModule``."""
    while True:
        if type(model).__name__ in _PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_noise_conditioned(model: nn.Module) -> bool:
    """True when ``model`` carries a NaRA adapter, i.e. its forward takes ``noise_level=``.

    Sees through DDP / FSDP / DataParallel wrappers and ``torch.compile``. A peft LoRA model or a bare model
    gives False.
    """
    model = _unwrap_parallel(model)
    return isinstance(model, NaRAModel) or isinstance(getattr(model, "base_model", None), NaRAModel)


def supports_logits_positions(model: nn.Module) -> bool:
    """True when the innermost model's ``forward`` has a ``logits_positions`` parameter (peft wrappers seen through)."""
    model = _unwrap_parallel(model)
    while isinstance(model, peft.PeftModel):
        model = _unwrap_parallel(model.get_base_model())
    try:
        return "logits_positions" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    noise_level: Optional[torch.Tensor] = None,
    logits_positions: Optional[bool] = None,
) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` and return the logits at ``positions`` only.

    Args:
        model: Called as ``model(input_ids, [logits_positions=positions], [noise_level=...])``; its output has
            ``.logits``.
        input_ids: ``[B, L]``.
        positions: ``[B, L]`` bool; the rows of the result follow ``positions.nonzero()`` (row-major).
        noise_level: ``[B]``; passed as ``noise_level=`` when given (NaRA models), left out otherwise.
        logits_positions: True: ask the model for those logits only (its forward takes ``logits_positions``);
            False: compute full ``[B, L, V]`` logits and gather; None: True when the model's forward has the
            parameter. A model that returns full logits anyway is gathered as well.

    Returns:
        ``[N, V]`` with N = ``positions.sum()``.
    """
    kwargs = {} if noise_level is None else {"noise_level": noise_level}
    if logits_positions is None:
        logits_positions = supports_logits_positions(model)
    if logits_positions:
        kwargs["logits_positions"] = positions
    logits = model(input_ids, **kwargs).logits
    if logits.dim() == 3:
        if logits.shape[:2] != positions.shape:
            raise ValueError(
                f"The model returned logits of shape {tuple(logits.shape)} for input of shape {tuple(positions.shape)}."
            )
        return logits[positions]
    expected = int(positions.sum())
    if logits.dim() != 2 or logits.shape[0] != expected:
        raise ValueError(
            f"With logits_positions the model must return [N, vocab] logits with N = {expected} (the selected "
            f"positions), got shape {tuple(logits.shape)}."
        )
    return logits


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    answer_lengths: torch.Tensor,
    *,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """LLaDA's SFT ELBO: per example Σ_masked CE / t / answer_len, averaged over the batch.

    Args:
        logits: ``[N, V]`` logits at the masked positions in ``masked.nonzero()`` order, or full ``[B, L, V]``.
        targets: ``[B, L]`` clean token ids x0.
        masked: ``[B, L]`` bool, the masked positions.
        t: ``[B]`` the noise level each example was masked with.
        answer_lengths: ``[B]`` answer tokens plus EOS padding (``L - prompt_length``).
        reduction: ``"mean"`` → scalar; ``"none"`` → ``[B]`` per-example losses.

    Returns:
        The loss in float32 (cross-entropy is computed in float32 whatever the logits' dtype). An example with
        no masked position (possible in Bernoulli mode) contributes 0 and still counts in the mean.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    if targets.shape != masked.shape or targets.dim() != 2:
        raise ValueError(
            f"targets and masked must both be [B, L], got {tuple(targets.shape)} and {tuple(masked.shape)}."
        )
    if logits.dim() == 3:
        logits = logits[masked]
    rows = masked.nonzero()[:, 0]
    if logits.dim() != 2 or logits.shape[0] != rows.numel():
        raise ValueError(
            f"logits must be [N, vocab] with N = {rows.numel()} masked positions (or [B, L, vocab]), got "
            f"{tuple(logits.shape)}."
        )
    token_ce = F.cross_entropy(logits.float(), targets[masked], reduction="none")  # [N]
    summed = torch.zeros(masked.shape[0], dtype=token_ce.dtype, device=token_ce.device).index_add(0, rows, token_ce)
    per_example = summed / (t.to(summed) * answer_lengths.to(summed))
    return per_example.mean() if reduction == "mean" else per_example


class SFTLossOutput(NamedTuple):
    """What `sft_loss` returns: the scalar loss and the `MaskedBatch` it was computed on (for logging)."""

    loss: torch.Tensor
    batch: MaskedBatch


def sft_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_lengths: Union[torch.Tensor, list[int]],
    *,
    mask_token_id: int,
    generator: Optional[torch.Generator] = None,
    eps: float = DEFAULT_EPS,
    mode: MaskingMode = "uniform",
    t: Optional[Union[torch.Tensor, float]] = None,
    logits_positions: Optional[bool] = None,
) -> SFTLossOutput:
    """One masked-diffusion SFT step: mask answers → forward → LLaDA ELBO.

    Args:
        model: A NaRA PeftModel (gets ``noise_level=t``), a peft LoRA PeftModel or a bare model.
        input_ids: ``[B, L]`` clean sequences from the SFT collator (prompt, answer, EOS, EOS padding).
        prompt_lengths: ``[B]`` prompt token counts.
        mask_token_id: The model's mask token (``model.config.mask_token_id``).
        generator: Random source for the masking.
        eps: t ~ U(eps, 1).
        mode: ``"uniform"`` (exactly ⌈t·answer_len⌉ masked) or ``"bernoulli"``; see `mask_answers`.
        t: Fixed noise levels instead of sampled ones (a float or ``[B]``), e.g. for a loss-vs-noise profile.
        logits_positions: See `logits_at`; None detects whether the model can compute logits at the masked
            positions only.

    Returns:
        ``SFTLossOutput(loss, batch)``: the scalar loss (with autograd) and the `MaskedBatch`.
    """
    batch = mask_answers(
        input_ids, prompt_lengths, mask_token_id=mask_token_id, mode=mode, eps=eps, t=t, generator=generator
    )
    noise_level = batch.t if is_noise_conditioned(model) else None
    logits = logits_at(model, batch.noisy_ids, batch.masked, noise_level=noise_level, logits_positions=logits_positions)
    loss = masked_diffusion_loss(logits, input_ids, batch.masked, batch.t, batch.answer_lengths)
    return SFTLossOutput(loss, batch)
