"""LLaDA's Monte-Carlo likelihood of a continuation, with the noise level each sample needs for an adapter; for any
family (a shifted one such as Dream is read at the row before each target token, by `Denoiser`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .denoiser import Denoiser, MaskRatio
from .model_info import model_device, resolve_mask_token_id
from .token_ids import check_special_ids, check_token_ids, model_vocab_size, token_ids_checked


def stratified_mask_counts(
    batch_size: int, target_length: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """LLaDA's stratified mask counts: a random start k ∈ [1, T], then ``batch_size`` evenly spaced counts mod T,
    each in [1, T]. Returns ``[batch_size]`` long (on the CPU)."""
    k = int(torch.randint(1, target_length + 1, (), generator=generator))
    counts = torch.linspace(float(k), k + (batch_size - 1) * (target_length / batch_size), steps=batch_size)
    counts = torch.round(counts).long()
    return (counts - 1) % target_length + 1


@torch.no_grad()
def mc_loglikelihood(
    model: nn.Module,
    prefix: Union[Sequence[int], torch.Tensor],
    target: Union[Sequence[int], torch.Tensor],
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    mask_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> float:
    """LLaDA's Monte-Carlo ELBO of ``log p(target | prefix)``.

    ``mc_num`` samples in mini-batches of ``batch_size``; each mini-batch masks exactly ``n`` target tokens at random
    positions, with ``n`` stratified over [1, T] (`stratified_mask_counts`); the prefix is never masked. The estimate
    is −mean over samples of Σ_masked CE / (n / T). A NaRA adapter gets λ = n / T (the sample's mask ratio over the
    target, as in training); a noise-bin set uses the bin of n / T. The logits that score a token are those that
    predict it under the model's family (`Denoiser`: Dream's output at i − 1, a token at position 0 from itself).
    ``cfg_scale`` > 0 adds LLaDA's unsupervised CFG (the prefix masked in the unconditional half).

    Returns:
        The estimate (a float; higher is more likely).

    Raises:
        ValueError: a prefix or target id (or the mask token) outside [0, vocab_size) of the model.
    """
    mask_id = resolve_mask_token_id(model, mask_token_id)
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be positive, got {mc_num} and {batch_size}.")
    device = model_device(model)
    prefix = torch.as_tensor(prefix, dtype=torch.long).flatten()
    target = torch.as_tensor(target, dtype=torch.long).flatten()
    if target.numel() == 0:
        raise ValueError("The continuation is empty: there is nothing to score.")
    vocab_size = model_vocab_size(model)
    check_token_ids(prefix, vocab_size, "prefix")  # once here; the model's per-forward check is skipped below
    check_token_ids(target, vocab_size, "target")
    check_special_ids(vocab_size, mask_token_id=mask_id)
    seq = torch.cat([prefix, target]).to(device)
    width, length = prefix.numel(), target.numel()
    total, done = torch.zeros((), dtype=torch.float64, device=device), 0
    with Denoiser(model) as denoise, token_ids_checked():
        while done < mc_num:
            size = min(batch_size, mc_num - done)
            counts = stratified_mask_counts(size, length, generator).to(device)
            scores = torch.rand((size, length), generator=generator).to(device)
            ranks = scores.argsort(1).argsort(1)
            masked = torch.cat([torch.zeros(size, width, dtype=torch.bool, device=device), ranks < counts[:, None]], 1)
            noisy = seq.expand(size, -1).masked_fill(masked, mask_id)
            noise = MaskRatio(counts, torch.full_like(counts, length))
            ids, positions = noisy, masked
            if cfg_scale > 0:
                uncond = noisy.clone()
                uncond[:, :width] = mask_id
                ids, positions = torch.cat([noisy, uncond]), torch.cat([masked, masked])
                noise = MaskRatio(noise.masked.repeat(2), noise.total.repeat(2))
            logits = denoise(ids, positions, noise).float()
            if cfg_scale > 0:
                cond, uncond_logits = logits.chunk(2)
                logits = uncond_logits + (cfg_scale + 1.0) * (cond - uncond_logits)
            ce = F.cross_entropy(logits, seq.expand(size, -1)[masked], reduction="none")
            rows = masked.nonzero()[:, 0]
            total += (ce.double() / (counts.double()[rows] / length)).sum()
            done += size
    return -float(total / mc_num)


__all__ = ["mc_loglikelihood", "stratified_mask_counts"]
