"""The masked-diffusion reverse process of LLaDA and Dream (one sampler core with per-family conventions), with the
noise level λ a NaRA adapter needs at every step, and the noise-bin (Multi-LoRA) baseline that switches adapters by λ.

    out = generate(model, input_ids, gen_length=256, steps=256, block_length=8)    # [B, P + 256]

The canvas is the prompt followed by ``gen_length`` mask tokens. The generation region is cut into blocks of
``block_length`` filled left to right; each block gets ``steps / num_blocks`` steps. A step is one forward pass over
the whole canvas (two halves of one doubled batch under classifier-free guidance); a proposal x0 is drawn for every
position of the current block (greedy, or exact Gumbel-max sampling at ``temperature``), and the still-masked
positions with the highest confidence are committed, as many as the step plan prescribes (LLaDA's linear schedule,
``transfer_schedule``), or, with ``threshold``, every one above τ (at least one). Committed tokens and the prompt never
change again. With ``till_eos``, an example whose finished block holds EOS decodes one more block, is filled with
EOS to the end and drops out of the batch.

λ is recomputed before each forward from the current canvas (`canvas_noise_level`), per example, on the device:

- ``"generation"`` (default): #[MASK] in the generation region / ``gen_length``. Training draws t over the answer
  region, so this is the quantity an adapter learned λ as (the NaRA authors' ``direct_noise=True``).
- ``"sequence"``: #[MASK] / #positions of the whole sequence (prompt included, padding excluded): the default of
  the authors' lm-eval wrapper (``direct_noise=False``).
- ``"block"``: #[MASK] in the current block / ``block_length``, for adapters trained with a blockwise process.

Model families (``model_type`` of the config, `nara_diffusion.text.model_info`) bring their conventions to the same
loop: the mask token and EOS (from the config), the logits shift (Dream's output at position i predicts token i + 1;
`Denoiser` reads the row before each position, position 0 from itself, the only place the sampler reads logits), and
the defaults of ``remasking`` and ``schedule`` (`nara_diffusion.text.unmasking.family_defaults`). Dream's
``diffusion_generate`` is ``generate(model, ids, gen_length=G, steps=S)`` on a Dream model (or `dream_generate`, with
its argument names): one block, Dream's ``"timesteps"`` plan (times linspace(1, eps, S + 1); each step reveals
int(#masked · (1 − s/t)), the last all), ``remasking`` = Dream's ``alg`` (``"origin"``, ``"maskgit_plus"``,
``"topk_margin"``, ``"entropy"``), ``alg_temp``, ``top_p``, ``top_k``; the algorithms and plans are in
`nara_diffusion.text.unmasking`. At temperature 0 (and ``alg_temp`` None or 0; ``"origin"`` with the same seed) the
tokens are those of Dream's Hub ``_sample``, with these differences by design: the mask token is never proposed
(Dream's can commit it, leaving the position masked), ties in confidence go to the lower position, a prompt may not
hold mask tokens (Dream would fill them in), confidences are computed in float32 (Dream's in the model's dtype, bf16
for the 7B, so a bf16 model can differ where two confidences round together), and the random streams of sampling
(temperature > 0, ``alg_temp`` > 0) are this module's. Threshold decoding applies to the probability-like confidences
(``low_confidence``, ``random``, ``maskgit_plus``, ``topk_margin``), and the K/V cache (below) to Dream too. A
NaRA adapter on Dream gets λ as on LLaDA: by default the masked fraction of the generation region, per example and
step (``noise_rule="generation"``, below).

A NaRA model receives it as ``noise_level=λ``; a LoRA or base model is called without it. A peft model whose
adapters are named ``noise_bin_1 … noise_bin_K`` is the noise-bin baseline: before each forward the adapter of bin
⌈λ·K⌉ (clamped to [1, K]) is made active, rows of different bins going through separate forwards. The bin is taken
from the exact fraction in integers (`nara_diffusion.text.noise_bins.noise_bin`), so λ = 3/5 with K = 5 is bin 3.

Fast decoding (Fast-dLLM, Wu et al. 2025): ``threshold`` (above) and ``cache=`` — ``"prefix"`` or ``"dual"`` — for
models that take a K/V cache (native LLaDA and Dream, bare or adapted). At a block's first step the forward runs the
whole canvas and returns the K/V of every position; the block's later steps reuse them: ``"prefix"`` keeps those of the
prompt and the finished blocks and runs the current block and everything after it, ``"dual"`` keeps the suffix after
the block too and runs the current block only. Both models attend both ways, so the reused K/V are an approximation
(they do not see the tokens committed since the block began), refreshed at every block boundary; a NaRA model's cached
K/V were computed at the λ of the block's first step, while the positions that run get the λ of the current step (per
example, from the canvas, as without a cache). ``cache=None`` is the exact reverse process. With Dream's shift the
later steps run one column more: the window starts at the column before the block (the prompt's or the previous
block's last token), whose output predicts the block's first position, and the prefix cache ends there (that column's
K/V are recomputed with the window's). Fast-dLLM's Dream code starts the window at the block and shifts inside it, so
the block's first position reads its own output; that is harmless there only because its block's first step always
commits that position, whatever its confidence. Here every step, the first included, commits by the chosen plan and
algorithm as without a cache (Dream's timesteps and ``alg``, or the threshold), so the first position may still be
masked at later steps and must be read from the row before it.

Tokens do not depend on the batch: a left-padded prompt is computed as if alone (native LLaDA gives each row its own
positions and attends over its real keys only, `nara_diffusion.text.llada`), a NaRA core does not depend on the other
rows (`Denoiser` memoises C(λ) by value: under the ``"generation"`` and ``"block"`` rules λ can only be k / n, and the
cores of that grid are computed once, together, when the call starts; any other value is computed alone when first
met; so the hypernetwork runs at most once per distinct λ per call, and once in all under those rules), and rows that
finish a block early under ``threshold`` take no-op steps until the others finish. On the CPU this makes a batch's
tokens exactly those of its prompts run one by one; accelerator kernels may pick different reductions for different
batch shapes.

With temperature 0, no adapter and the same settings, the tokens are those of LLaDA's reference ``generate()``.
Differences by design: ties in confidence go to the lower position (a stable sort; ``torch.topk`` leaves them
unspecified); confidence is computed in float32 from the logits of the current block only (the reference takes the
softmax over the whole canvas in the model's dtype); Gumbel noise is drawn for the current block only, so sampled
outputs (temperature > 0) follow the same distribution but not the reference's random stream; and
``suppress_tokens`` ranks the suppressed candidates last, where LLaDA's ``confidence_eos_eot_inf`` sets EoT's logit to
-∞ before the softmax (which also renormalises the other tokens' confidence).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from .denoiser import Denoiser, MaskRatio, memoize_cores, supports_kv_cache
from .kv_cache import KVCache
from .masking import uniform
from .model_info import model_device, model_family, resolve_mask_token_id, unwrap_parallel
from .token_ids import check_special_ids, check_token_ids, model_vocab_size, token_ids_checked
from .unmasking import (
    DEFAULT_EPS,
    DREAM_ALGS,
    RANKED_DREAM_ALGS,
    REMASKING,
    SCHEDULES,
    THRESHOLD_REMASKING,
    Step,
    dream_proposal,
    family_defaults,
    gumbel_argmax,
    gumbel_keys,
    reveal_at_random,
    step_plan,
    transfer_schedule,
)

NoiseRule = Literal["generation", "sequence", "block"]
Remasking = Literal["low_confidence", "random", "origin", "maskgit_plus", "topk_margin", "entropy"]
Schedule = Literal["linear", "timesteps"]
CacheMode = Literal["prefix", "dual"]
NOISE_RULES: tuple[str, ...] = ("generation", "sequence", "block")
CACHE_MODES: tuple[str, ...] = ("prefix", "dual")
# Confidence given to suppressed candidates: below any probability (and any U[0, 1) draw), above non-candidates.
_SUPPRESSED = -1.0


# -- noise levels -------------------------------------------------------------------------------------------------
def canvas_noise_level(
    canvas: torch.Tensor,
    rule: NoiseRule,
    *,
    mask_token_id: int,
    gen_start: int,
    block: tuple[int, int],
    valid: Optional[torch.Tensor] = None,
) -> MaskRatio:
    """The noise level of each canvas under ``rule``, computed on the device (no host synchronisation).

    Args:
        canvas: ``[B, L]`` token ids; the generation region is ``canvas[:, gen_start:]``.
        rule: ``"generation"``, ``"sequence"`` or ``"block"`` (see the module docstring).
        mask_token_id: The mask token.
        gen_start: Width of the (left-padded) prompt.
        block: ``(start, end)`` columns of the current block.
        valid: ``[B, L]`` bool, the non-padding positions (``"sequence"`` counts only these); None: all.

    Returns:
        `MaskRatio` with ``[B]`` numerators and denominators.
    """
    batch, length = canvas.shape
    if rule == "generation":
        region = canvas[:, gen_start:]
    elif rule == "block":
        region = canvas[:, block[0] : block[1]]
    elif rule == "sequence":
        is_mask = canvas == mask_token_id
        if valid is None:
            return MaskRatio(is_mask.sum(1), torch.full((batch,), length, device=canvas.device))
        return MaskRatio((is_mask & valid).sum(1), valid.sum(1))
    else:
        raise ValueError(f"noise_rule must be one of {NOISE_RULES}, got {rule!r}.")
    masked = (region == mask_token_id).sum(1)
    return MaskRatio(masked, torch.full_like(masked, region.shape[1]))


# -- one step -------------------------------------------------------------------------------------------------------
def propose(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    remasking: Remasking = "low_confidence",
    suppress_tokens: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposed tokens x0 and their confidence.

    Args:
        logits: ``[B, Lb, V]`` float logits of the current block (banned tokens already at −∞).
        temperature: 0 for greedy, else Gumbel-max sampling at that temperature.
        remasking: ``"low_confidence"``: softmax probability of x0 under the un-noised logits; ``"random"``: U(0, 1);
            Dream's ``"maskgit_plus"``, ``"topk_margin"``, ``"entropy"``, ``"origin"``
            (`nara_diffusion.text.unmasking.dream_proposal`).
        suppress_tokens: ``[K]`` long; a proposal of one of these tokens is ranked last (confidence −1; for Dream's
            algorithms, whose confidence can be below −1, the dtype's minimum).
        generator: Random source for sampling and random confidence.
        top_p, top_k: Dream's nucleus / top-k cuts (Dream's algorithms only).

    Returns:
        ``(x0 [B, Lb] long, confidence [B, Lb] float)``.
    """
    if remasking in DREAM_ALGS:
        x0, confidence = dream_proposal(
            logits, remasking, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
        )
        suppressed = torch.finfo(confidence.dtype).min
    else:
        x0 = gumbel_argmax(logits, temperature, generator)
        if remasking == "low_confidence":
            confidence = torch.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        else:
            confidence = uniform(x0.shape, generator, x0.device, logits.dtype)
        suppressed = _SUPPRESSED
    if suppress_tokens is not None and suppress_tokens.numel():
        confidence = confidence.masked_fill(torch.isin(x0, suppress_tokens), suppressed)
    return x0, confidence


def select_transfer(
    confidence: torch.Tensor, candidates: torch.Tensor, k: Optional[int], threshold: Optional[float] = None
) -> torch.Tensor:
    """Which candidates to commit: the ``k`` most confident (ties → lower position), or with ``threshold`` every
    candidate with confidence ≥ τ plus the most confident one. ``confidence``, ``candidates``: ``[B, Lb]`` →
    ``[B, Lb]`` bool."""
    confidence = confidence.masked_fill(~candidates, float("-inf"))
    if threshold is None:
        order = confidence.sort(dim=1, descending=True, stable=True).indices[:, :k]
        chosen = torch.zeros_like(candidates).scatter_(1, order, True)
    else:
        chosen = (confidence >= threshold).scatter_(1, confidence.argmax(1, keepdim=True), True)
    return chosen & candidates


# -- the canvas -----------------------------------------------------------------------------------------------------
@dataclass
class _Canvas:
    """The rows still being generated, and the output they are written back to when they finish."""

    x: torch.Tensor  # [n, L] current canvases
    attention_mask: Optional[torch.Tensor]  # [n, L], None when no row is padded
    rows: torch.Tensor  # [n] rows of `out`
    uncond_prompt: Optional[torch.Tensor]  # [n, P] the prompt with its real tokens masked (CFG only)
    pending: torch.Tensor  # [n] bool: EOS seen in an earlier block, decoding the one extra block
    out: torch.Tensor  # [B, L]

    def keep(self, keep: torch.Tensor) -> None:
        self.out[self.rows[~keep]] = self.x[~keep]
        self.x, self.rows, self.pending = self.x[keep], self.rows[keep], self.pending[keep]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[keep]
        if self.uncond_prompt is not None:
            self.uncond_prompt = self.uncond_prompt[keep]

    def result(self) -> torch.Tensor:
        self.out[self.rows] = self.x
        return self.out


def _start_canvas(
    input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], gen_length: int, mask_id: int, cfg: bool
) -> _Canvas:
    batch, width = input_ids.shape
    gen = torch.full((batch, gen_length), mask_id, dtype=torch.long, device=input_ids.device)
    x = torch.cat([input_ids.long(), gen], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones_like(gen, dtype=attention_mask.dtype)], dim=1)
    uncond = None
    if cfg:  # LLaDA's unsupervised CFG: the unconditional half sees the prompt as masks
        real = attention_mask[:, :width].bool() if attention_mask is not None else torch.ones_like(input_ids).bool()
        uncond = input_ids.long().masked_fill(real, mask_id)
    rows = torch.arange(batch, device=x.device)
    pending = torch.zeros(batch, dtype=torch.bool, device=x.device)
    return _Canvas(x, attention_mask, rows, uncond, pending, x.clone())


@dataclass(frozen=True)
class _Settings:
    width: int
    gen_length: int
    block_length: int
    num_blocks: int
    schedule: list[Step]  # the step plan of every block
    temperature: float
    cfg_scale: float
    remasking: str
    noise_rule: str
    threshold: Optional[float]
    cache: Optional[str]
    mask_id: int
    eos_id: Optional[int]
    till_eos: bool
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    alg_temp: Optional[float] = None


def _model_inputs(
    canvas: _Canvas, s: _Settings, block: tuple[int, int], needs_noise: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[MaskRatio]]:
    """(input ids, attention mask, λ) of one forward: the canvas, or [canvas; unconditional canvas] under CFG."""
    ids, attn = canvas.x, canvas.attention_mask
    if canvas.uncond_prompt is not None:
        ids = torch.cat([ids, torch.cat([canvas.uncond_prompt, canvas.x[:, s.width :]], dim=1)])
        attn = None if attn is None else torch.cat([attn, attn])
    noise = None
    if needs_noise:
        valid = None if attn is None else attn.bool()
        noise = canvas_noise_level(
            ids, s.noise_rule, mask_token_id=s.mask_id, gen_start=s.width, block=block, valid=valid
        )
    return ids, attn, noise


def _step(
    canvas: _Canvas,
    denoise: Denoiser,
    s: _Settings,
    block: tuple[int, int],
    step: Optional[Step],
    banned: Optional[torch.Tensor],
    suppress: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    kv: Optional[KVCache] = None,
) -> Optional[KVCache]:
    """One reverse step on every active row: forward, propose, commit in place.

    Without a cache, or at a block's first step (``kv`` None), the forward runs the whole canvas; with ``s.cache``
    it also returns the K/V to reuse for the block's later steps (prefix: cut to the columns before the window).
    Those steps run the window — the block and everything after it (prefix) or the block alone (dual), starting
    ``shift`` columns earlier for a shifted family, whose output there predicts the block's first position — against
    ``kv``, which is returned unchanged. ``step``: how many to commit (or, for ``"origin"``, with which probability);
    None under a threshold."""
    start, end = block
    ids, attn, noise = _model_inputs(canvas, s, block, denoise.needs_noise_level)
    first = start - denoise.logits_shift  # the window's first column (the prompt is never empty: first >= 0)
    if kv is None:
        positions = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        positions[:, start:end] = True
        logits, kv = denoise.cached(ids, positions, noise, attn, use_cache=s.cache is not None)
        if kv is not None and s.cache == "prefix":
            kv = kv.crop(first)
    else:
        window = ids[:, first : ids.shape[1] if s.cache == "prefix" else end]
        positions = torch.zeros(window.shape, dtype=torch.bool, device=ids.device)
        positions[:, start - first : end - first] = True
        logits, _ = denoise.cached(window, positions, noise, attn, cache=kv, query_start=first)
    logits = logits.view(ids.shape[0], end - start, -1).float()
    if canvas.uncond_prompt is not None:
        cond, uncond = logits.chunk(2)
        logits = uncond + (s.cfg_scale + 1.0) * (cond - uncond)
    if banned is not None:
        logits[..., banned] = float("-inf")
    x0, confidence = propose(
        logits,
        temperature=s.temperature,
        remasking=s.remasking,
        suppress_tokens=suppress,
        generator=generator,
        top_p=s.top_p,
        top_k=s.top_k,
    )
    current = canvas.x[:, start:end]
    candidates = current == s.mask_id
    if s.remasking == "origin":
        chosen = reveal_at_random(candidates, step.fraction, generator)
    else:
        if s.alg_temp:
            confidence = gumbel_keys(confidence, s.alg_temp, generator)
        chosen = select_transfer(confidence, candidates, None if step is None else step.count, s.threshold)
    canvas.x[:, start:end] = torch.where(chosen, x0, current)
    return kv


def _block_steps(s: _Settings, canvas: _Canvas, block: tuple[int, int]) -> Iterator[Optional[Step]]:
    """The steps of a block (those that commit nothing skipped); with a threshold, steps until every row's block is
    filled."""
    if s.threshold is None:
        yield from (step for step in s.schedule if step.count or s.remasking == "origin")
        return
    for _ in itertools.count():
        if not bool((canvas.x[:, block[0] : block[1]] == s.mask_id).any()):
            return
        yield None


def _end_block(canvas: _Canvas, s: _Settings, block: tuple[int, int]) -> bool:
    """Early termination after a block: rows that were decoding their extra block are filled with EOS and leave.
    Returns True when no row is left."""
    finished = canvas.pending
    canvas.pending = (canvas.x[:, block[0] : block[1]] == s.eos_id).any(1) & ~finished
    if bool(finished.any()):  # one host sync per block
        canvas.x[finished, block[1] :] = s.eos_id
        canvas.keep(~finished)
    return canvas.x.shape[0] == 0


# -- the sampler ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    gen_length: int,
    steps: int,
    block_length: Optional[int] = None,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: Optional[Remasking] = None,
    till_eos: Optional[bool] = None,
    noise_rule: NoiseRule = "generation",
    attention_mask: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    cache: Optional[CacheMode] = None,
    suppress_tokens: Sequence[int] = (),
    banned_tokens: Sequence[int] = (),
    mask_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    max_length: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    schedule: Optional[Schedule] = None,
    eps: float = DEFAULT_EPS,
    alg_temp: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
) -> torch.Tensor:
    """Generate with the reverse process of the model's family (LLaDA's, or Dream's ``diffusion_generate``); returns
    the whole sequences (prompt + generation), as both do.

    Args:
        model: A masked-diffusion LM (native LLaDA or Dream, or anything returning ``.logits``), bare or with a NaRA,
            LoRA or noise-bin adapter set (see the module docstring).
        input_ids: ``[B, P]`` prompts, left-padded when their lengths differ.
        gen_length: Tokens to generate, G (Dream's ``max_new_tokens``).
        steps: Reverse steps in all, split evenly across blocks; at most ``gen_length`` under the linear schedule.
        block_length: Semi-autoregressive block size; must divide ``gen_length``. None: one block (pure diffusion).
        temperature: 0: greedy; > 0: exact sampling from softmax(logits / T) by Gumbel-max (float64).
        cfg_scale: Unsupervised classifier-free guidance: ``un + (cfg + 1)·(cond − un)``, the unconditional half
            seeing the prompt as masks (one doubled batch).
        remasking: Which masked positions a step reveals (Dream's ``alg``; `nara_diffusion.text.unmasking`): LLaDA's
            ``"low_confidence"`` (the most probable proposals first) or ``"random"``; Dream's ``"maskgit_plus"``,
            ``"topk_margin"``, ``"entropy"`` or ``"origin"`` (each position with probability 1 − s/t). None: the
            family's (LLaDA ``"low_confidence"``, Dream ``"entropy"``, the algorithm of Dream's README example).
        till_eos: Block-wise early termination: once a finished block of an example contains EOS, decode one more
            block, fill the rest with EOS and stop that example. None: on for NaRA models (the authors' harness),
            off otherwise (LLaDA's sampler).
        noise_rule: How λ is read off the canvas: ``"generation"``, ``"sequence"`` or ``"block"``.
        attention_mask: ``[B, P]``, 1 for prompt tokens and 0 for left padding; extended with ones over the
            generation. None: no padding.
        threshold: Confidence-threshold parallel decoding (Fast-dLLM): each step commits every candidate with
            confidence ≥ τ and at least one; a block takes as many steps as it needs (at most ``block_length``), and
            ``steps`` only has to pass validation.
        cache: Block-wise K/V cache (Fast-dLLM): None (exact), ``"prefix"`` (the prompt's and finished blocks' K/V
            computed at each block's first step and reused by its later steps) or ``"dual"`` (the suffix's too). An
            approximation refreshed at each block boundary, since LLaDA and Dream are bidirectional; a NaRA model's
            cached K/V are those of the λ at the block's first step (see the module docstring). Needs a model that
            takes a cache (native LLaDA or Dream; Dream's later steps also run the column before the block).
            ``cache="dual", threshold=0.9`` is Fast-dLLM's fast setting (Dream: with a ``block_length`` and
            ``remasking="maskgit_plus"``, whose confidence is a probability).
        suppress_tokens: Token ids whose proposals are ranked last (LLaDA's EOS/EoT confidence suppression).
        banned_tokens: Token ids never proposed (logits set to −∞; LLaDA's ``logits_eos_inf``). The mask token is
            never proposed either: committed, it would stay masked and the block would not fill (a trained LLaDA
            never predicts it, so this changes nothing there).
        mask_token_id, eos_token_id: Default: ``model.config.mask_token_id`` / ``eos_token_id``.
        max_length: Longest sequence the model takes. Default: ``model.config.max_sequence_length`` (or
            ``max_position_embeddings``); None there: unchecked.
        generator: Random source for sampling and random remasking.
        schedule: How many positions each step of a block reveals: ``"linear"`` (LLaDA's ``transfer_schedule``) or
            ``"timesteps"`` (Dream's: times linspace(1, ``eps``, S + 1), int(#masked · (1 − s/t)) per step, the rest
            at the last step). None: the family's (LLaDA linear, Dream timesteps).
        eps: The final time of the timesteps schedule (Dream's ``eps``, default 1e-3 as in its generation config).
        alg_temp: Dream's ``alg_temp``: > 0 draws the positions to reveal from softmax(confidence / alg_temp) instead
            of taking the most confident (``maskgit_plus``, ``topk_margin``, ``entropy``); None or 0: the most
            confident.
        top_p, top_k: Dream's nucleus and top-k cuts of the logits before its proposals and confidences (Dream's
            algorithms only). None: no cut.

    Returns:
        ``[B, P + G]`` long token ids on the model's device.

    Raises:
        ValueError: ``gen_length`` not divisible by ``block_length``, ``steps`` not divisible by the number of
            blocks or (linear schedule) larger than ``gen_length``, an empty prompt, a prompt that with
            ``gen_length`` exceeds the model's maximum length, the mask token inside a prompt, padding not on the
            left, a prompt id (padding included) or special token id outside [0, vocab_size) (``config.vocab_size``
            and the input embedding's rows; checked once, before the first step), an unknown option or a combination
            that does not apply (e.g. ``top_p`` with LLaDA's remasking, ``threshold`` with ``"entropy"``), a
            noise-bin adapter set with a missing bin.
    """
    config = getattr(model, "config", None)
    mask_id = resolve_mask_token_id(model, mask_token_id)
    eos_id = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    if isinstance(eos_id, (list, tuple)):  # some configs list several EOS ids: the first one ends and fills
        eos_id = eos_id[0] if eos_id else None
    input_ids, attention_mask = _check_prompts(input_ids, attention_mask, int(mask_id))
    vocab_size = model_vocab_size(model)
    check_token_ids(input_ids, vocab_size)  # once here, so the model's own per-forward check can be skipped below
    device = model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    limit = max_length if max_length is not None else _model_max_length(config)
    # Under the generation and block rules λ = k / n for a known n, so the cores of that grid are computed up front.
    grid = {"generation": gen_length, "block": block_length or gen_length}.get(noise_rule)
    denoise = Denoiser(model, memoize_cores=True, noise_grid=grid)
    if till_eos is None:
        till_eos = denoise.noise_conditioned and eos_id is not None
    defaults = family_defaults(model_family(model))
    settings = _check_settings(
        width=input_ids.shape[1],
        gen_length=gen_length,
        steps=steps,
        block_length=gen_length if block_length is None else block_length,
        temperature=temperature,
        cfg_scale=cfg_scale,
        remasking=defaults.remasking if remasking is None else remasking,
        noise_rule=noise_rule,
        threshold=threshold,
        cache=cache,
        schedule=defaults.schedule if schedule is None else schedule,
        eps=eps,
        alg_temp=alg_temp,
        top_p=top_p,
        top_k=top_k,
        mask_id=int(mask_id),
        eos_id=None if eos_id is None else int(eos_id),
        till_eos=bool(till_eos),
        max_length=limit,
    )
    if settings.cache is not None and not denoise.kv_cache:
        raise ValueError(
            f"cache={settings.cache!r} needs a model that takes and returns a K/V cache (the native LLaDA or Dream "
            f"of nara_diffusion.text, bare or with adapters); {type(unwrap_parallel(model)).__name__} does not. "
            "Use cache=None."
        )
    if settings.remasking == "origin" and len(suppress_tokens):
        raise ValueError("suppress_tokens ranks proposals by confidence; remasking='origin' reveals at random.")
    check_special_ids(
        vocab_size,
        mask_token_id=settings.mask_id,
        eos_token_id=settings.eos_id if settings.till_eos else None,  # written into the canvas only then
        banned_tokens=banned_tokens,
        suppress_tokens=suppress_tokens,
    )
    banned = _id_tensor([*banned_tokens, settings.mask_id], device)  # a committed [MASK] would stay masked
    suppress = _id_tensor(suppress_tokens, device)
    canvas = _start_canvas(input_ids, attention_mask, settings.gen_length, settings.mask_id, settings.cfg_scale > 0)
    with denoise, token_ids_checked():
        for b in range(settings.num_blocks):
            block = (settings.width + b * settings.block_length, settings.width + (b + 1) * settings.block_length)
            kv: Optional[KVCache] = None  # filled at the block's first step when caching
            for step in _block_steps(settings, canvas, block):
                kv = _step(canvas, denoise, settings, block, step, banned, suppress, generator, kv)
            if settings.till_eos and _end_block(canvas, settings, block):
                break
    return canvas.result()


def dream_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    steps: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.2,
    top_p: Optional[float] = 0.95,
    top_k: Optional[int] = None,
    alg: Remasking = "entropy",
    alg_temp: Optional[float] = 0.0,
    eps: float = DEFAULT_EPS,
    generator: Optional[torch.Generator] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Dream's ``diffusion_generate`` under its own argument names: `generate` with one block and Dream's timesteps
    schedule. The defaults are the settings of Dream's README example (``steps`` = ``max_new_tokens``, temperature 0.2,
    top-p 0.95, ``alg="entropy"``, ``alg_temp=0``) and the Hub generation config's ``eps`` 1e-3; ``temperature=0,
    top_p=None`` is deterministic. ``kwargs`` go to `generate` (e.g. ``threshold``, ``banned_tokens``). Returns
    ``[B, P + max_new_tokens]`` token ids."""
    return generate(
        model,
        input_ids,
        gen_length=max_new_tokens,
        steps=max_new_tokens if steps is None else steps,
        attention_mask=attention_mask,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        remasking=alg,
        alg_temp=alg_temp,
        eps=eps,
        schedule="timesteps",
        generator=generator,
        **kwargs,
    )


# -- validation -----------------------------------------------------------------------------------------------------
def _check_prompts(
    input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], mask_id: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of shape [batch, prompt_length], got {shape}.")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"Empty prompt (input_ids has shape {tuple(input_ids.shape)}): give at least one prompt token, e.g. "
            "the chat template's BOS and user turn."
        )
    real = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}."
            )
        real = attention_mask.to(input_ids.device).bool()
        if bool((real[:, 1:] < real[:, :-1]).any()):
            raise ValueError(
                "Padding must be on the left (tokenizer.padding_side = 'left'): the generation is appended after the "
                "last column, so a right-padded prompt would be followed by padding."
            )
        empty = (~real.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"Empty prompt: rows {empty} of attention_mask hold no token.")
        if bool(real.all()):
            attention_mask = None  # no padding: plain attention (SDPA may pick its fastest kernel)
    bad = ((input_ids == mask_id) & real).nonzero().tolist()
    if bad:
        raise ValueError(
            f"The mask token ({mask_id}) appears inside the prompt at (row, position) {bad[:5]}; a prompt must be "
            "clean text (the sampler would treat those positions as still to generate)."
        )
    return input_ids, attention_mask


def _check_settings(
    *,
    width: int,
    gen_length: int,
    steps: int,
    block_length: int,
    max_length: Optional[int],
    temperature: float,
    cfg_scale: float,
    remasking: str,
    noise_rule: str,
    threshold: Optional[float],
    cache: Optional[str] = None,
    schedule: str = "linear",
    eps: float = DEFAULT_EPS,
    alg_temp: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    **rest: Any,
) -> _Settings:
    for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}): the generation is cut "
            "into whole blocks."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps ({steps}) must be divisible by the number of blocks (gen_length / block_length = {num_blocks}), "
            "since each block gets the same number of steps."
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if steps > gen_length and schedule == "linear":
        raise ValueError(
            f"steps ({steps}) exceeds gen_length ({gen_length}): every step commits at least one token; use "
            f"steps <= {gen_length} (steps = gen_length is one token per step)."
        )
    if max_length is not None and width + gen_length > max_length:
        raise ValueError(
            f"The prompt ({width} tokens) plus gen_length ({gen_length}) is {width + gen_length} tokens, more than "
            f"the model's maximum length {max_length}; shorten the prompt or gen_length."
        )
    if not (temperature >= 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}.")
    if not (cfg_scale >= 0 and cfg_scale != float("inf")):
        raise ValueError(f"cfg_scale must be a finite number >= 0 (0 disables guidance), got {cfg_scale!r}.")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}.")
    _check_dream_options(remasking, threshold, eps, alg_temp, top_p, top_k)
    if noise_rule not in NOISE_RULES:
        raise ValueError(f"noise_rule must be one of {NOISE_RULES}, got {noise_rule!r}.")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1] (a confidence), got {threshold!r}.")
    if cache is not None and cache not in CACHE_MODES:
        raise ValueError(f"cache must be None, 'prefix' or 'dual', got {cache!r}.")
    if rest["till_eos"] and rest["eos_id"] is None:
        raise ValueError("till_eos needs the EOS token: pass eos_token_id= (the model's config has none).")
    return _Settings(
        width=width,
        gen_length=int(gen_length),
        block_length=int(block_length),
        num_blocks=int(num_blocks),
        schedule=step_plan(schedule, int(block_length), int(steps // num_blocks), float(eps)),
        temperature=float(temperature),
        cfg_scale=float(cfg_scale),
        remasking=remasking,
        noise_rule=noise_rule,
        threshold=threshold,
        cache=cache,
        top_p=None if top_p is None else float(top_p),
        top_k=None if top_k is None else int(top_k),
        alg_temp=float(alg_temp) if alg_temp else None,  # 0 is Dream's "take the most confident", as None
        **rest,
    )


def _check_dream_options(
    remasking: str,
    threshold: Optional[float],
    eps: float,
    alg_temp: Optional[float],
    top_p: Optional[float],
    top_k: Optional[int],
) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1) (the final time of the timesteps schedule), got {eps!r}.")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (the nucleus' probability), got {top_p!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if (top_p is not None or top_k is not None) and remasking not in DREAM_ALGS:
        raise ValueError(
            f"top_p / top_k shape Dream's proposals and confidences (remasking one of {DREAM_ALGS}); "
            f"remasking={remasking!r} does not use them: leave them None."
        )
    if alg_temp is not None and not (isinstance(alg_temp, numbers.Real) and 0 <= alg_temp < float("inf")):
        raise ValueError(f"alg_temp must be a finite number >= 0 (0 or None: the most confident), got {alg_temp!r}.")
    if alg_temp and remasking not in RANKED_DREAM_ALGS:
        raise ValueError(
            f"alg_temp samples positions by Dream's confidence: remasking must be one of "
            f"{RANKED_DREAM_ALGS}, got {remasking!r}."
        )
    if alg_temp and threshold is not None:
        raise ValueError(
            "alg_temp draws a fixed number of positions per step and threshold reveals by confidence: use one of them."
        )
    if threshold is not None and remasking not in THRESHOLD_REMASKING:
        raise ValueError(
            f"threshold compares a confidence in [0, 1] with τ; remasking={remasking!r} has none ('origin') or a "
            f"negative one ('entropy'): use one of {THRESHOLD_REMASKING}, or threshold=None."
        )


def _id_tensor(ids: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
    ids = [int(i) for i in ids if i is not None]
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _model_max_length(config: Any) -> Optional[int]:
    for name in ("max_sequence_length", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


__all__ = [
    "CACHE_MODES",
    "NOISE_RULES",
    "REMASKING",
    "SCHEDULES",
    "Denoiser",
    "MaskRatio",
    "canvas_noise_level",
    "dream_generate",
    "generate",
    "gumbel_argmax",
    "memoize_cores",
    "propose",
    "select_transfer",
    "supports_kv_cache",
    "transfer_schedule",
]
