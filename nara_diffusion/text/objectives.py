"""The masked-diffusion SFT objective (LLaDA's ELBO) and the forward pass that feeds it.

For a batch of B examples with clean tokens x0, masked positions M_b, noise levels t_b and answer lengths n_b
(answer tokens plus EOS padding):

    loss = (1/B) · Σ_b  Σ_{i ∈ M_b} CE(logits_{b,i}, x0_{b,i}) / t_b / n_b

`masked_diffusion_loss` is that formula on tensors; `sft_loss` runs the whole step: mask the answers, call the model
(with ``noise_level=t`` when it carries a NaRA adapter, asking for logits at the masked positions only when the
model supports it), and compute the loss. It works the same for a NaRA PeftModel, a peft LoRA PeftModel and a
bare model being fully fine-tuned, and for every model family: `logits_at` reads a shifted family's logits (Dream
predicts position i from position i−1) at the row before each position, so no objective knows about the shift.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, NamedTuple, Optional, Union

import peft
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from nara_diffusion.core.noise import ComputedNoiseLevel
from nara_diffusion.core.tuner import is_nara_model

from .masking import DEFAULT_EPS, MaskedBatch, MaskingMode, answer_region, mask_answers, sample_t
from .model_info import logits_shift, unwrap_parallel


def is_noise_conditioned(model: nn.Module) -> bool:
    """True when ``model`` carries a NaRA adapter, i.e. its forward takes ``noise_level=``.

    Covers NaRA PeftModels and models adapted in place (`nd.inject_nara`), through DDP / FSDP / DataParallel
    wrappers and ``torch.compile``. A peft LoRA model or a bare model gives False.
    """
    return is_nara_model(unwrap_parallel(model))


def supports_logits_positions(model: nn.Module) -> bool:
    """True when the innermost model's ``forward`` has a ``logits_positions`` parameter (peft wrappers seen through)."""
    model = unwrap_parallel(model)
    while isinstance(model, peft.PeftModel):
        model = unwrap_parallel(model.get_base_model())
    try:
        return "logits_positions" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def align_logits(logits: torch.Tensor, shift: int) -> torch.Tensor:
    """Full logits ``[B, L, V]`` of a model that predicts ``shift`` positions ahead, re-indexed so that row i predicts
    the token at position i: row i takes the model's row i − shift, and the first ``shift`` rows take row 0 (Dream's
    convention: ``cat([logits[:, :1], logits[:, :-1]])``). ``shift`` 0 returns ``logits`` itself."""
    if shift == 0:
        return logits
    source = (torch.arange(logits.shape[1], device=logits.device) - shift).clamp(min=0)
    return logits.index_select(1, source)


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    noise_level: Optional[torch.Tensor] = None,
    logits_positions: Optional[bool] = None,
) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` and return the logits that predict the tokens at ``positions``.

    The family's convention is applied here, once for every objective: a model that predicts ``shift`` positions
    ahead (`model_info.logits_shift`: Dream's 1) is read at ``position − shift`` (position 0 from itself), so row n
    of the result always predicts the token at the n-th selected position.

    Args:
        model: Called as ``model(input_ids, [logits_positions=...], [noise_level=...])``; its output has ``.logits``.
        input_ids: ``[B, L]``.
        positions: ``[B, L]`` bool; the rows of the result follow ``positions.nonzero()`` (row-major).
        noise_level: ``[B]`` λ computed by the library (see `ComputedNoiseLevel`); passed as ``noise_level=`` when
            given (NaRA models), left out otherwise.
        logits_positions: True: ask the model for those logits only (its forward takes ``logits_positions``);
            False: compute full ``[B, L, V]`` logits and gather; None: True when the model's forward has the
            parameter. A model that returns full logits anyway is gathered as well. With a shift, a selected
            position below the shift (which would read a model row twice) falls back to full logits.

    Returns:
        ``[N, V]`` with N = ``positions.sum()``.
    """
    # λ here is computed by the library (a sampled t or a mask fraction), in [0, 1] by construction
    kwargs = {} if noise_level is None else {"noise_level": ComputedNoiseLevel(noise_level)}
    shift = logits_shift(model)
    if logits_positions is None:
        logits_positions = supports_logits_positions(model)
    if shift and bool(positions[:, :shift].any()):
        logits_positions = False
    source = positions if not shift else F.pad(positions[:, shift:], (0, shift), value=False)
    if logits_positions:
        kwargs["logits_positions"] = source
    logits = model(input_ids, **kwargs).logits
    if logits.dim() == 3:
        if logits.shape[:2] != positions.shape:
            raise ValueError(
                f"The model returned logits of shape {tuple(logits.shape)} for input of shape {tuple(positions.shape)}."
            )
        if not shift:
            return logits[positions]
        rows, cols = positions.nonzero(as_tuple=True)
        return logits[rows, (cols - shift).clamp(min=0)]
    expected = int(positions.sum())
    if logits.dim() != 2 or logits.shape[0] != expected:
        raise ValueError(
            f"With logits_positions the model must return [N, vocab] logits with N = {expected} (the selected "
            f"positions), got shape {tuple(logits.shape)}."
        )
    return logits


#: The cross-entropy expands at most this many logits to float32 at a time (row chunks; 128 MiB of float32).
CE_CHUNK_ELEMENTS = 1 << 25


class _TokenCrossEntropy(torch.autograd.Function):
    """Cross-entropy of each row of ``[N, V]`` logits against its target, in float32, memory-lean.

    ``F.cross_entropy(logits.float(), ...)`` keeps a float32 copy of the logits, saves the float32 log-probabilities
    for backward and, in backward, builds their float32 gradient next to them: about 12 bytes per logit at the peak,
    which dominates training memory at LLaDA's 126k vocabulary (the bf16 logits themselves are 2 bytes). Here the
    float32 math runs in row chunks and only ``softmax − one_hot`` is saved, in the logits' dtype (the dtype the
    gradient reaches the logits in anyway): about 4 bytes per logit at the peak. Same values; the same gradient up to
    one extra rounding to the logits' dtype (``softmax − one_hot`` is rounded before the per-token weight multiplies
    it: at most one bf16 ulp).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = max(1, CE_CHUNK_ELEMENTS // max(1, logits.shape[1]))
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            x = logits[rows].to(torch.float32, copy=True)  # a copy: modified in place below
            target = targets[rows].unsqueeze(1)
            lse = torch.logsumexp(x, dim=1, keepdim=True)
            loss[rows] = (lse - x.gather(1, target)).squeeze(1)
            if grad is not None:
                probs = x.sub_(lse).exp_()
                grad[rows] = probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        (grad,) = ctx.saved_tensors
        out = torch.empty_like(grad)
        chunk = max(1, CE_CHUNK_ELEMENTS // max(1, grad.shape[1]))
        for start in range(0, grad.shape[0], chunk):
            rows = slice(start, start + chunk)
            out[rows] = grad[rows].float() * grad_loss[rows].unsqueeze(1)
        return out, None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, reduction="none")`` with a third of its peak memory.

    Args:
        logits: ``[N, V]`` in any floating dtype.
        targets: ``[N]`` class indices.

    Returns:
        ``[N]`` float32 per-row cross-entropy, differentiable with respect to ``logits`` (once).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [N, V] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    return _TokenCrossEntropy.apply(logits, targets)


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
        The loss in float32 (cross-entropy is computed in float32 whatever the logits' dtype, in row chunks that
        keep the peak memory near twice the logits' own size; see `token_cross_entropy`). An example with no masked
        position (possible in Bernoulli mode) contributes 0 and still counts in the mean.
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
    token_ce = token_cross_entropy(logits, targets[masked])  # [N] float32, ~4 bytes per logit at the peak
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


# -- LIFT: which tokens to supervise at which noise level (Parashar et al., 2026) ----------------------------------
LiftMode = Literal["top", "bottom", "random"]
LIFT_VARIANTS: tuple[str, ...] = ("lift3", "lift2")
LIFT_POLICIES: tuple[str, ...] = ("time", "random")
RHO_DISTRIBUTIONS: tuple[str, ...] = ("code", "paper")
_VARIANT_MODES: dict[str, tuple[str, ...]] = {"lift3": ("random", "top", "bottom"), "lift2": ("top", "bottom")}


def sample_rho(t_raw: torch.Tensor, *, dist: str = "code", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The extra mask ratio ρ of LIFT's superset view, per example (``[B]``).

    ``dist="code"`` follows the authors' code: ρ ~ U(0.1, 1−t), or U(0, 1−t) when 1−t ≤ 0.1; ``"paper"`` is the
    paper's ρ ~ U(0, 1−t). ``t_raw`` is t before the ε shift, as in their collator.
    """
    if dist not in RHO_DISTRIBUTIONS:
        raise ValueError(f"rho distribution must be one of {RHO_DISTRIBUTIONS}, got {dist!r}.")
    upper = 1.0 - t_raw
    lower = torch.zeros_like(upper) if dist == "paper" else torch.where(upper <= 0.1, 0.0, 0.1).to(upper)
    u = torch.rand(t_raw.shape, generator=generator, device=t_raw.device, dtype=t_raw.dtype)
    return lower + (upper - lower) * u


def choose_lift_modes(
    t: torch.Tensor,
    *,
    variant: str = "lift3",
    policy: str = "time",
    vanilla_coef: float = 3.0,
    generator: Optional[torch.Generator] = None,
) -> list[str]:
    """The LIFT mode of each example: ``"top"`` (most confident superset tokens), ``"bottom"`` (least confident) or
    ``"random"`` (a uniform subset, the vanilla mode).

    ``policy="time"`` takes the argmax of the scores: LIFT-3 scores (c·t(1−t), t, 1−t) for (random, top, bottom),
    giving bottom below t = 1/3, random between, top above 2/3 for c = 3; LIFT-2 scores (t, 1−t) for (top, bottom).
    Ties go to the first mode, as ``argmax`` does in the authors' code. ``policy="random"`` ignores t (ablation).
    """
    if variant not in LIFT_VARIANTS:
        raise ValueError(f"LIFT variant must be one of {LIFT_VARIANTS}, got {variant!r}.")
    if policy not in LIFT_POLICIES:
        raise ValueError(f"LIFT policy must be one of {LIFT_POLICIES}, got {policy!r}.")
    modes = _VARIANT_MODES[variant]
    if policy == "random":
        picks = torch.randint(len(modes), t.shape, generator=generator, device=t.device)
    else:
        tf = t.double()
        scores = [tf, 1 - tf] if variant == "lift2" else [vanilla_coef * tf * (1 - tf), tf, 1 - tf]
        picks = torch.stack(scores, dim=1).argmax(dim=1)
    return [modes[i] for i in picks.tolist()]


def _per_example_modes(mode: Union[str, list[str]], batch: int) -> list[str]:
    modes = [mode] * batch if isinstance(mode, str) else list(mode)
    if len(modes) != batch or any(m not in ("top", "bottom", "random") for m in modes):
        raise ValueError(f"mode must be 'top', 'bottom' or 'random' (or one of them per example), got {mode!r}.")
    return modes


def lift_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor,
    rho: torch.Tensor,
    prompt_lengths: Union[torch.Tensor, list[int]],
    *,
    mode: Union[LiftMode, list[str]],
    approximate: bool = False,
    generator: Optional[torch.Generator] = None,
    logits_positions: Optional[bool] = None,
) -> torch.Tensor:
    """LIFT's selection step and loss on a superset-masked batch.

    Of the n superset-masked answer tokens of each example, k = round(n · t/(t+ρ)) are kept: by the model's own
    confidence log p(x0 | superset view) from a no-grad forward (``"top"``: the most confident, ``"bottom"``: the
    least), or uniformly at random (``"random"``: no scoring forward). The others are refilled with their true
    tokens, so the trained view has mask ratio ≈ t, and the loss is LLaDA's ELBO on the kept tokens:
    per example Σ CE / t / answer_len, averaged over the batch (for one example exactly the authors' loss). A NaRA
    model gets λ = the realised mask ratio of each forward.

    Args:
        model: NaRA, LoRA or bare model (see `sft_loss`).
        input_ids: ``[B, L]`` with the mask token at the superset positions.
        labels: ``[B, L]`` the true token at the superset positions, -100 elsewhere.
        t: ``[B]`` noise levels (after the ε shift); ``rho``: ``[B]`` the superset's extra ratio.
        prompt_lengths: ``[B]``; the answer length is ``L - prompt_length``.
        mode: ``"top"``, ``"bottom"`` or ``"random"``, or one of them per example (see `choose_lift_modes`).
        approximate: Use the scoring forward (then run with gradients) for the loss too: one forward in all.
        generator: Random source of the ``"random"`` mode.

    Returns:
        The scalar loss.
    """
    batch, seq_len = input_ids.shape
    modes = _per_example_modes(mode, batch)
    superset = labels != -100
    targets = torch.where(superset, labels, input_ids)
    answer_lengths = seq_len - torch.as_tensor(prompt_lengths, device=input_ids.device)
    noise_conditioned = is_noise_conditioned(model)
    n_superset = superset.sum(dim=1)

    frac = (t / torch.clamp(t + rho, min=1e-3)).clamp(1e-3, 1.0)
    k = (n_superset * frac).round().long()
    is_random = torch.tensor([m == "random" for m in modes], device=input_ids.device)
    # the authors' vanilla mode keeps at least one token; top/bottom-k may keep none
    k = torch.where(is_random & (n_superset > 0), k.clamp(min=1), k).minimum(n_superset)

    scores = torch.rand(superset.shape, generator=generator, device=input_ids.device)
    superset_logits = None
    if not all(m == "random" for m in modes):
        lam = n_superset / answer_lengths if noise_conditioned else None
        with torch.set_grad_enabled(approximate and torch.is_grad_enabled()):
            superset_logits = logits_at(model, input_ids, superset, noise_level=lam, logits_positions=logits_positions)
        with torch.no_grad():
            gold = F.log_softmax(superset_logits.float(), dim=-1).gather(-1, targets[superset].unsqueeze(-1))
            confidence = torch.zeros(superset.shape, device=input_ids.device).masked_scatter(superset, gold.squeeze(-1))
        sign = torch.tensor([{"top": 1.0, "bottom": -1.0}.get(m, 0.0) for m in modes], device=input_ids.device)
        scores = torch.where(is_random.unsqueeze(1), scores, confidence * sign.unsqueeze(1))
    scores = scores.masked_fill(~superset, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(seq_len, device=order.device).expand_as(order))
    keep = superset & (ranks < k.unsqueeze(1))

    if approximate and superset_logits is not None:
        logits = superset_logits[keep[superset]]
    else:
        train_ids = torch.where(superset & ~keep, targets, input_ids)
        lam = keep.sum(dim=1) / answer_lengths if noise_conditioned else None
        logits = logits_at(model, train_ids, keep, noise_level=lam, logits_positions=logits_positions)
    return masked_diffusion_loss(logits, targets, keep, t, answer_lengths)


def lift_sft_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_lengths: Union[torch.Tensor, list[int]],
    *,
    mask_token_id: int,
    generator: Optional[torch.Generator] = None,
    eps: float = DEFAULT_EPS,
    mode: MaskingMode = "uniform",
    variant: str = "lift3",
    policy: str = "time",
    rho_dist: str = "code",
    vanilla_coef: float = 3.0,
    approximate: bool = False,
    logits_positions: Optional[bool] = None,
) -> torch.Tensor:
    """One LIFT training step from clean sequences: t and ρ per example, the superset view with ratio t+ρ
    (masked as ``mode`` says), the mode chosen by t (`choose_lift_modes`), then `lift_loss`."""
    batch = input_ids.shape[0]
    t_raw = torch.rand(batch, generator=generator, device=input_ids.device, dtype=torch.float64)
    rho = sample_rho(t_raw, dist=rho_dist, generator=generator)
    t = ((1 - eps) * t_raw + eps).float()
    superset = mask_answers(
        input_ids,
        prompt_lengths,
        mask_token_id=mask_token_id,
        mode=mode,
        t=(t + rho.float()).clamp(max=1.0),
        generator=generator,
    )
    labels = input_ids.masked_fill(~superset.masked, -100)
    modes = choose_lift_modes(t, variant=variant, policy=policy, vanilla_coef=vanilla_coef, generator=generator)
    return lift_loss(
        model,
        superset.noisy_ids,
        labels,
        t,
        rho.float(),
        prompt_lengths,
        mode=modes,
        approximate=approximate,
        generator=generator,
        logits_positions=logits_positions,
    )


# -- GIFT: entropy-guided per-token mask rates (a baseline LIFT's authors compare with) ------------------------------
def gift_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_lengths: Union[torch.Tensor, list[int]],
    *,
    mask_token_id: int,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    eps: float = DEFAULT_EPS,
    logits_positions: Optional[bool] = None,
) -> torch.Tensor:
    """GIFT, as implemented in LIFT's trainer: a no-grad forward on the fully masked response gives each token's
    predictive entropy H_i; with β_i = √H_i the token is masked with probability t_i = 1 − (1−t)^(β_i / mean β)
    and its CE is weighted 1/t_i; the loss is Σ CE/t_i / #masked per example, averaged over the batch.

    Response tokens are the answer positions, minus padding when ``pad_token_id`` is given (the authors exclude
    EOS padding). mean β is taken per example (the authors' batch-wide mean; equal for one example). An example
    that draws no masked token masks its highest-t_i token. NaRA models get λ = the realised mask ratio.
    """
    batch, seq_len = input_ids.shape
    prompts = torch.as_tensor(prompt_lengths, device=input_ids.device)
    region = answer_region(prompts, seq_len)
    answer_lengths = seq_len - prompts
    response = region if pad_token_id is None else region & (input_ids != pad_token_id)
    response = torch.where(response.any(dim=1, keepdim=True), response, region)  # an all-padding answer: use it all
    noise_conditioned = is_noise_conditioned(model)
    t = sample_t(batch, eps=eps, generator=generator, device=input_ids.device)

    with torch.no_grad():
        all_masked = input_ids.masked_fill(response, mask_token_id)
        lam = response.sum(dim=1) / answer_lengths if noise_conditioned else None
        logits = logits_at(model, all_masked, response, noise_level=lam, logits_positions=logits_positions).float()
        log_probs = logits.log_softmax(dim=-1)
        entropy = (-(log_probs.exp() * log_probs).sum(dim=-1)).clamp_min(0)
        beta = torch.zeros(response.shape, device=input_ids.device).masked_scatter(response, entropy.sqrt())
        mean_beta = (beta.sum(dim=1) / response.sum(dim=1)).clamp_min(1e-12)
        t_tok = 1 - (1 - t.unsqueeze(1)) ** (beta / mean_beta.unsqueeze(1))
        t_tok = t_tok.clamp_min(1e-6)
        u = torch.rand(response.shape, generator=generator, device=input_ids.device)
        masked = response & (u < t_tok)
        fallback = torch.zeros_like(masked).scatter_(1, t_tok.masked_fill(~response, -1).argmax(1, keepdim=True), True)
        masked = torch.where(masked.any(dim=1, keepdim=True), masked, fallback)

    lam = masked.sum(dim=1) / answer_lengths if noise_conditioned else None
    logits = logits_at(
        model, input_ids.masked_fill(masked, mask_token_id), masked, noise_level=lam, logits_positions=logits_positions
    )
    token_ce = F.cross_entropy(logits.float(), input_ids[masked], reduction="none") / t_tok[masked]
    rows = masked.nonzero()[:, 0]
    summed = torch.zeros(batch, device=token_ce.device).index_add(0, rows, token_ce)
    return (summed / masked.sum(dim=1)).mean()
