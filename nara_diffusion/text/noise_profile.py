"""The noise-level loss profile: the masked-diffusion SFT loss of a model at fixed noise levels t, for the base
model and each adapter on the same masks, and its plot (where along the noise levels an adapter gains).

Two quantities (``tokens=``): ``"all"`` is LLaDA's ELBO over every masked answer position, EOS padding included (what
training minimises); ``"answer"`` is the mean cross-entropy of the masked answer tokens only, the positions before the
first EOS of the answer, so that a short answer's loss is not swamped by the padding the model learns to predict at
every t (the paper's Figure 1 question: where along t does an adapter's gain lie).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import collate_sft
from .denoiser import Denoiser
from .loading import load_adapter
from .masking import MASKING_MODES, MaskingMode, mask_answers
from .model_info import model_device, resolve_mask_token_id
from .noise_bins import noise_bin_of_level
from .objectives import is_noise_conditioned, logits_at, sft_loss
from .token_ids import check_special_ids, check_token_ids, model_vocab_size, token_ids_checked

ProfileTokens = Literal["all", "answer"]
PROFILE_TOKENS: tuple[str, ...] = ("all", "answer")


@torch.no_grad()
def noise_profile(
    model: nn.Module,
    dataset: Dataset,
    ts: Sequence[float],
    *,
    mask_token_id: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
    mode: MaskingMode = "uniform",
    tokens: ProfileTokens = "all",
    eos_token_id: Optional[int] = None,
    progress: bool = False,
) -> torch.Tensor:
    """The masked-diffusion SFT loss (LLaDA's ELBO) of ``model`` on ``dataset`` at each fixed noise level t.

    For each t, every example has ⌈t·answer_len⌉ answer tokens masked (``mode="uniform"``); the positions come
    from a CPU generator seeded by (seed, t index, batch index), so every model compared with the same dataset,
    ``ts``, ``batch_size`` and ``seed`` sees the same masks. A NaRA adapter gets λ = t; a noise-bin set uses the
    adapter of t's bin (`noise_bin_of_level`: a t within float32 rounding of a bin edge counts as the edge).

    Args:
        model: Base model, or one with a NaRA, LoRA or noise-bin adapter.
        dataset: Tokenised SFT examples (`tokenize_sft` / `load_sft_data`), items ``{"input_ids", "prompt_length"}``.
        ts: Noise levels in (0, 1].
        mask_token_id: Default ``model.config.mask_token_id``.
        batch_size: Examples per forward.
        seed: Seed of the masks.
        mode: ``"uniform"`` (exactly ⌈t·n⌉ masked) or ``"bernoulli"``.
        tokens: ``"all"``: the ELBO per example (every masked answer position, EOS padding included), averaged over
            examples; ``"answer"``: the cross-entropy of masked answer tokens before the first EOS, averaged over
            those tokens (the masks are the same as with ``"all"``; a t at which no answer token is masked gives NaN).
        eos_token_id: The EOS that ends an answer (``tokens="answer"``). Default ``model.config.eos_token_id``.
        progress: Show a progress bar.

    Returns:
        ``[len(ts)]`` float64: the loss at each t.
    """
    from tqdm.auto import tqdm

    if mode not in MASKING_MODES:
        raise ValueError(f"mode must be one of {MASKING_MODES}, got {mode!r}.")
    if tokens not in PROFILE_TOKENS:
        raise ValueError(f"tokens must be one of {PROFILE_TOKENS}, got {tokens!r}.")
    ts = [float(t) for t in ts]
    if not ts or not all(0.0 < t <= 1.0 for t in ts):
        raise ValueError(f"ts must be noise levels in (0, 1], got {ts}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    mask_id = resolve_mask_token_id(model, mask_token_id)
    device = model_device(model)
    vocab_size = model_vocab_size(model)
    eos_id = None
    if tokens == "answer":
        config = getattr(model, "config", None)
        eos_id = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
        if isinstance(eos_id, (list, tuple)):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is None:
            raise ValueError("tokens='answer' needs the EOS that ends an answer: pass eos_token_id=.")
    check_special_ids(vocab_size, mask_token_id=mask_id, eos_token_id=eos_id)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_sft)
    losses = torch.zeros(len(ts), dtype=torch.float64)
    with Denoiser(model) as denoise, token_ids_checked():  # the ids are checked per batch below, before the device
        for i, t in enumerate(tqdm(ts, disable=not progress, desc="noise profile")):
            if denoise.num_bins:
                denoise.use_bin(noise_bin_of_level(t, denoise.num_bins))
            total, count = 0.0, 0
            for j, batch in enumerate(loader):
                gen = torch.Generator().manual_seed((seed * 1_000_003 + i) * 100_003 + j)
                if i == 0:  # on the CPU: no device sync; the same batches come back for every t
                    check_token_ids(batch["input_ids"], vocab_size, f"input_ids (rows = examples {j * batch_size}+)")
                ids, prompts = batch["input_ids"].to(device), batch["prompt_lengths"].to(device)
                if tokens == "all":
                    loss = sft_loss(model, ids, prompts, mask_token_id=mask_id, generator=gen, t=t, mode=mode).loss
                    total += float(loss) * ids.shape[0]
                    count += ids.shape[0]
                else:
                    summed, n = _answer_token_loss(model, ids, prompts, mask_id, eos_id, gen, t, mode)
                    total += summed
                    count += n
            losses[i] = total / count if count else float("nan")
    return losses


def answer_positions(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[B, L]`` bool: the answer tokens of each SFT sequence, from the end of the prompt up to (not including) the
    first EOS after it."""
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    answer = columns >= prompt_lengths[:, None]
    eos = (input_ids == eos_token_id) & answer
    first = torch.where(eos.any(1), eos.int().argmax(1), input_ids.shape[1])
    return answer & (columns < first[:, None])


def _answer_token_loss(
    model: nn.Module,
    ids: torch.Tensor,
    prompts: torch.Tensor,
    mask_id: int,
    eos_id: int,
    gen: torch.Generator,
    t: float,
    mode: MaskingMode,
) -> tuple[float, int]:
    """Summed cross-entropy and count of the masked answer tokens of one batch (the masks `sft_loss` would draw)."""
    batch = mask_answers(ids, prompts, mask_token_id=mask_id, mode=mode, t=t, generator=gen)
    lam = batch.t if is_noise_conditioned(model) else None
    logits = logits_at(model, batch.noisy_ids, batch.masked, noise_level=lam)
    keep = answer_positions(ids, prompts, eos_id)[batch.masked]
    if not bool(keep.any()):
        return 0.0, 0
    loss = F.cross_entropy(logits[keep].float(), ids[batch.masked][keep], reduction="sum")
    return float(loss), int(keep.sum())


def compare_noise_profiles(
    base: nn.Module,
    adapters: Mapping[str, Union[str, Path]],
    dataset: Dataset,
    ts: Sequence[float],
    *,
    base_label: str = "base",
    **profile_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """`noise_profile` of the base model and of each adapter put on it in turn (same masks for all).

    Args:
        base: The base model; each adapter is loaded onto it (`load_adapter`) and unloaded again afterwards.
        adapters: Label → adapter folder (NaRA, LoRA or noise-bin set).
        dataset, ts, **profile_kwargs: As in `noise_profile`.
        base_label: Label of the base model's curve (None-like empty string: leave it out).

    Returns:
        Label → ``[len(ts)]`` losses, base first.
    """
    profiles: dict[str, torch.Tensor] = {}
    if base_label:
        profiles[base_label] = noise_profile(base, dataset, ts, **profile_kwargs)
    for label, path in adapters.items():
        model = load_adapter(base, path)
        try:
            profiles[label] = noise_profile(model, dataset, ts, **profile_kwargs)
        finally:
            base = model.unload()
    return profiles


def plot_noise_profiles(
    ts: Sequence[float],
    profiles: Mapping[str, Sequence[float]],
    path: Union[str, Path],
    *,
    baseline: Optional[str] = "base",
    title: str = "Masked-diffusion loss by noise level",
) -> Path:
    """Draw loss-vs-t curves (left) and, when ``baseline`` is among the profiles, each model's loss reduction
    relative to it (right: where an adapter's gain lies along the noise levels). Writes a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_gain = baseline is not None and baseline in profiles and len(profiles) > 1
    fig, axes = plt.subplots(1, 2 if with_gain else 1, figsize=(11 if with_gain else 6, 4), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(profiles)}  # one colour per model in both panels
    ax = axes[0, 0]
    for name, values in profiles.items():
        ax.plot(list(ts), [float(v) for v in values], marker="o", color=colors[name], label=name)
    ax.set(xlabel="noise level t (fraction of answer tokens masked)", ylabel="loss (ELBO per example)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if with_gain:
        ax = axes[0, 1]
        base = [float(v) for v in profiles[baseline]]
        for name, values in profiles.items():
            if name != baseline:
                gain = [b - float(v) for b, v in zip(base, values, strict=True)]
                ax.plot(list(ts), gain, marker="o", color=colors[name], label=name)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(xlabel="noise level t", ylabel=f"loss reduction vs {baseline}", title="Gain by noise level")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["PROFILE_TOKENS", "answer_positions", "compare_noise_profiles", "noise_profile", "plot_noise_profiles"]
