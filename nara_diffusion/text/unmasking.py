"""Which masked positions a reverse step reveals, and with which tokens: the step plans and the confidence algorithms
of LLaDA and Dream, used by the one sampler core (`nara_diffusion.text.sampler.generate`).

Remasking algorithms (``remasking=``, which Dream calls ``alg``), each giving a proposal x0 and a confidence per
position of the current block:

- LLaDA's ``"low_confidence"``: x0 = argmax of the logits (Gumbel-max at a temperature), confidence = softmax(logits)
  at x0; ``"random"``: confidence U[0, 1).
- Dream's (``sample_tokens`` of its Hub ``generation_utils.py``): the logits are divided by the temperature (when > 0),
  cut to the top-p nucleus and then the top-k tokens (the rest set to the dtype's minimum); probs = softmax; x0 = the
  most probable token (temperature 0) or a draw from probs; confidence ``"maskgit_plus"``: probs at x0,
  ``"topk_margin"``: top-1 − top-2 probability, ``"entropy"``: Σ p·log(p + 1e-10) (minus the entropy).
  ``"origin"`` has no confidence: each masked position is revealed independently with the step's probability.

How many positions a step reveals: the ``count`` most confident (ties → the lower position), or, with ``alg_temp`` > 0,
``count`` positions drawn without replacement from softmax(confidence / alg_temp) (the Gumbel-top-k trick: the
distribution of Dream's ``torch.multinomial``, from another random stream).

Step plans (``schedule=``) for a block of m positions and S steps, one `Step` (count, fraction) per step:

- ``"linear"`` (LLaDA): count_i = ⌊m/S⌋ + [i < m mod S] (`transfer_schedule`); fraction_i = count_i over the
  positions still masked before step i.
- ``"timesteps"`` (Dream): t = linspace(1, eps, S + 1) in float32; fraction_i = 1 − t_{i+1}/t_i and count_i =
  int(m_i · fraction_i) with m_i the positions still masked, both in float32 as Dream computes them; the last step
  reveals all that are left (fraction 1). Dream's Hub code takes m_i as the batch mean of the rows' masked counts;
  each row starts with the same number of masks (prompts hold none) and reveals the same count at every step, so
  the mean is every row's own count: the plan is per row, the same for all rows, and a row's tokens do not depend
  on the rest of the batch. Steps whose count is 0 reveal nothing and are skipped (no forward).

Family defaults (`family_defaults`, from the config's ``model_type``): LLaDA ``remasking="low_confidence"``,
``schedule="linear"``; Dream ``remasking="entropy"`` (the algorithm of Dream's README example; the Hub code's own
default, ``"origin"``, reveals in random order, which Dream's README says may degrade performance) and
``schedule="timesteps"`` with ``eps`` 1e-3 (the Hub's ``DreamGenerationConfig`` default).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .masking import uniform

LLADA_REMASKING: tuple[str, ...] = ("low_confidence", "random")
DREAM_ALGS: tuple[str, ...] = ("origin", "maskgit_plus", "topk_margin", "entropy")
REMASKING: tuple[str, ...] = LLADA_REMASKING + DREAM_ALGS
#: Algorithms whose confidence ranks positions (``alg_temp`` applies to these).
RANKED_DREAM_ALGS: tuple[str, ...] = ("maskgit_plus", "topk_margin", "entropy")
#: Algorithms whose confidence is a probability-like number in [0, 1], so a threshold τ ∈ (0, 1] means something.
THRESHOLD_REMASKING: tuple[str, ...] = ("low_confidence", "random", "maskgit_plus", "topk_margin")
SCHEDULES: tuple[str, ...] = ("linear", "timesteps")
DEFAULT_EPS = 1e-3  # Dream's final time
ENTROPY_EPS = 1e-10  # Dream's log(p + ε)


class Step(NamedTuple):
    """One reverse step of a block: reveal ``count`` positions (ranked algorithms), or each masked position with
    probability ``fraction`` (``"origin"``; under the timesteps plan exactly Dream's float32 value)."""

    count: int
    fraction: float


class FamilyDefaults(NamedTuple):
    remasking: str
    schedule: str


_DEFAULTS = FamilyDefaults("low_confidence", "linear")
FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {"Dream": FamilyDefaults("entropy", "timesteps")}


def family_defaults(family: Optional[str]) -> FamilyDefaults:
    """The remasking algorithm and step plan of a model family (``model_type``); LLaDA's for any other family."""
    return FAMILY_DEFAULTS.get(family or "", _DEFAULTS)


# -- step plans -----------------------------------------------------------------------------------------------------
def transfer_schedule(block_length: int, steps_per_block: int) -> list[int]:
    """Tokens committed at each step of a block under LLaDA's linear schedule: ``⌊m/S⌋ + [i < m mod S]``."""
    base, extra = divmod(block_length, steps_per_block)
    return [base + (i < extra) for i in range(steps_per_block)]


def step_plan(schedule: str, block_length: int, steps: int, eps: float = DEFAULT_EPS) -> list[Step]:
    """The `Step` of each of a block's ``steps`` steps under ``schedule`` (see the module docstring)."""
    if schedule == "linear":
        plan, left = [], block_length
        for count in transfer_schedule(block_length, steps):
            plan.append(Step(count, count / left))
            left -= count
        return plan
    if schedule != "timesteps":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    times = torch.linspace(1, eps, steps + 1, dtype=torch.float32)
    plan, left = [], block_length
    for i in range(steps):
        if i == steps - 1:
            step = Step(left, 1.0)
        else:
            fraction = 1 - times[i + 1] / times[i]  # float32, as Dream computes it
            step = Step(int(torch.tensor(float(left)) * fraction), float(fraction))
        plan.append(step)
        left -= step.count
    return plan


# -- proposals -------------------------------------------------------------------------------------------------------
def gumbel_argmax(
    logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """A draw from ``softmax(logits / temperature)`` per position by the Gumbel-max trick in float64.

    argmax ``exp(l) / (−log u)^T`` (LLaDA's form) is computed as argmax ``l − T·log(−log u)``, which is the same
    draw without overflow. ``temperature`` 0 is the plain argmax. ``logits``: ``[..., V]`` → ``[...]`` long.
    """
    if temperature == 0:
        return logits.argmax(-1)
    u = uniform(logits.shape, generator, logits.device, torch.float64)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(-1)


def filter_logits(logits: torch.Tensor, top_p: Optional[float] = None, top_k: Optional[int] = None) -> torch.Tensor:
    """Dream's nucleus and top-k cuts: tokens outside the top-p nucleus (a token is dropped when the probability of
    the tokens ranked above it already exceeds ``top_p``), then outside the ``top_k`` largest logits (ties with the
    k-th kept), get the dtype's minimum. ``[..., V]`` → ``[..., V]``; None (or ``top_p`` ≥ 1) cuts nothing."""
    low = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)
        above = F.pad(ranked.softmax(-1).cumsum(-1)[..., :-1], (1, 0))  # probability ranked above each token
        logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, above > top_p), low)
    if top_k is not None:
        kth = logits.topk(min(int(top_k), logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, low)
    return logits


def dream_proposal(
    logits: torch.Tensor,
    alg: str,
    *,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's proposals and confidences (see the module docstring).

    Args:
        logits: ``[B, Lb, V]`` float logits of the current block, already aligned (row j predicts position j).
        alg: One of `DREAM_ALGS`.
        temperature: 0: the most probable token; > 0: a draw from the tempered, filtered distribution (Gumbel-max in
            float64, the same distribution as Dream's ``Categorical`` draw).
        top_p, top_k: `filter_logits`; they also shape the confidences (probabilities renormalised over the kept
            tokens), as in Dream.
        generator: Random source of the draws.

    Returns:
        ``(x0 [B, Lb] long, confidence [B, Lb] in the logits' dtype)``; ``"origin"`` returns probs at x0.
    """
    if temperature > 0:
        logits = logits / temperature
    logits = filter_logits(logits, top_p, top_k)
    probs = logits.softmax(-1)
    if temperature > 0:
        x0 = gumbel_argmax(logits, 1.0, generator)
        confidence = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top = probs.topk(2, dim=-1).values
        confidence = top[..., 0] - top[..., 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + ENTROPY_EPS)).sum(-1)
    elif alg not in ("maskgit_plus", "origin"):
        raise ValueError(f"alg must be one of {DREAM_ALGS}, got {alg!r}.")
    return x0, confidence


# -- which positions -----------------------------------------------------------------------------------------------
def reveal_at_random(
    candidates: torch.Tensor, fraction: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Dream's ``"origin"``: each candidate revealed independently with probability ``fraction``, one U[0, 1) draw per
    candidate in row-major order (Dream's draw: the same stream for the same seed). ``[B, Lb]`` bool → bool."""
    draws = uniform((int(candidates.sum()),), generator, candidates.device)  # one host sync per step
    chosen = torch.zeros_like(candidates)
    chosen[candidates] = draws < fraction
    return chosen


def gumbel_keys(confidence: torch.Tensor, alg_temp: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Ranking keys ``confidence / alg_temp + Gumbel`` in float64: the top ``count`` keys are ``count`` positions drawn
    without replacement from softmax(confidence / alg_temp) (Dream's ``alg_temp``). ``[B, Lb]`` → ``[B, Lb]``."""
    u = uniform(confidence.shape, generator, confidence.device, torch.float64)
    return confidence.double() / alg_temp - torch.log(-torch.log(u))


__all__ = [
    "DREAM_ALGS",
    "FAMILY_DEFAULTS",
    "LLADA_REMASKING",
    "REMASKING",
    "SCHEDULES",
    "FamilyDefaults",
    "Step",
    "dream_proposal",
    "family_defaults",
    "filter_logits",
    "gumbel_argmax",
    "gumbel_keys",
    "reveal_at_random",
    "step_plan",
    "transfer_schedule",
]
