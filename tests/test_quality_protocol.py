"""The evidence tools of the quality benchmark: the answer-only noise profile, and the statistics of the protocol."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference import f32_tol
from torch import nn

from nara_diffusion.text.data import SFTDataset
from nara_diffusion.text.noise_profile import answer_positions, noise_profile

V, MASK, EOS = 12, 11, 10


class ConstantLogits(nn.Module):
    """Every position gets the same logits ``z``: the cross-entropy of token y is logsumexp(z) − z[y]."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.z = z
        self.config = SimpleNamespace(vocab_size=V, mask_token_id=MASK, eos_token_id=EOS)

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.z.expand(*input_ids.shape, V).clone())


# prompts of tokens 0..3, answers of 1-3 digits (tokens 4..9) and their EOS; items are padded with EOS to length 10
SEQUENCES = [[1, 2, 3, 5, 6, EOS], [0, 3, 7, EOS], [2, 1, 0, 3, 4, 8, 9, EOS]]
PROMPTS = [3, 2, 4]


def dataset() -> SFTDataset:
    return SFTDataset(SEQUENCES, PROMPTS, max_length=10, eos_token_id=EOS)


def test_answer_positions_stop_at_the_first_eos_after_the_prompt():
    data = dataset()
    ids = torch.stack([data[i]["input_ids"] for i in range(3)])
    got = answer_positions(ids, torch.tensor(PROMPTS), EOS)
    want = torch.zeros(3, 10, dtype=torch.bool)
    want[0, 3:5] = want[1, 2:3] = want[2, 4:7] = True
    assert torch.equal(got, want)


def test_answer_only_profile_excludes_the_eos_padding():
    # digits (4..9) have logit 0, EOS has logit 6: a digit costs lse(z) nats at every t, EOS far less
    z = torch.zeros(V)
    z[EOS] = 6.0
    lse = float(torch.logsumexp(z, 0))
    model = ConstantLogits(z)
    ts = [0.2, 0.5, 1.0]
    answer = noise_profile(model, dataset(), ts, batch_size=2, tokens="answer")
    tol = f32_tol(V + 10, magnitude=lse)  # one float32 log-softmax over V logits, summed over ≤ 10 tokens
    assert torch.allclose(answer, torch.full((3,), lse, dtype=torch.float64), rtol=0, atol=tol)
    # at t = 1 every answer position is masked: the ELBO is the mean over examples of the mean over positions
    elbo = noise_profile(model, dataset(), [1.0], batch_size=2)
    eos_cost = lse - 6.0
    per_example = []
    for seq, prompt in zip(SEQUENCES, PROMPTS, strict=True):
        digits, positions = len(seq) - 1 - prompt, 10 - prompt
        per_example.append((digits * lse + (positions - digits) * eos_cost) / positions)
    assert elbo.item() == pytest.approx(sum(per_example) / 3, rel=0, abs=tol)
    assert elbo.item() < 0.8 * lse


def test_answer_only_profile_needs_an_eos():
    model = ConstantLogits(torch.zeros(V))
    model.config.eos_token_id = None
    with pytest.raises(ValueError, match="eos_token_id"):
        noise_profile(model, dataset(), [0.5], tokens="answer")
    with pytest.raises(ValueError, match="tokens must be one of"):
        noise_profile(model, dataset(), [0.5], tokens="digits")


# -- the protocol's statistics (benchmarks/_stats.py) ----------------------------------------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _stats  # noqa: E402


def test_t_interval_matches_a_hand_computation():
    # values 0.4, 0.5, 0.6, 0.5, 0.5: mean 0.5, sample std sqrt(0.02 / 4), t_{0.975,4} = 2.776 (printed tables)
    s = _stats.summarize([0.4, 0.5, 0.6, 0.5, 0.5])
    std = (0.02 / 4) ** 0.5
    assert s.mean == pytest.approx(0.5) and s.std == pytest.approx(std)
    assert s.high - s.mean == pytest.approx(2.776 * std / 5**0.5)
    assert s.low == pytest.approx(2 * s.mean - s.high)
    with pytest.raises(ValueError, match="at least 2"):
        _stats.t975(0)


def test_paired_bootstrap_is_exact_when_there_is_nothing_to_resample():
    ones, zeros = [[1.0] * 50] * 3, [[0.0] * 50] * 3
    d = _stats.paired_bootstrap(ones, zeros, resamples=200)
    assert (d.diff, d.low, d.high) == (1.0, 1.0, 1.0)
    same = [[float(i % 2) for i in range(50)]] * 3
    assert _stats.paired_bootstrap(same, same, resamples=200).high == 0.0
    with pytest.raises(ValueError, match="one shape"):
        _stats.paired_bootstrap(ones, [[0.0] * 49] * 3)


def test_paired_bootstrap_interval_has_the_width_of_the_analytic_one():
    # one seed, 4000 problems; A right with p = 0.6, B with 0.5, independent: SE of the mean difference is
    # sqrt((0.6·0.4 + 0.5·0.5) / n) and the 95% interval is about ±1.96 SE around the observed difference
    rng = np.random.default_rng(7)
    n = 4000
    a, b = (rng.random(n) < 0.6).astype(float), (rng.random(n) < 0.5).astype(float)
    d = _stats.paired_bootstrap([a], [b], resamples=2000, seed=1)
    se = ((0.6 * 0.4 + 0.5 * 0.5) / n) ** 0.5
    assert d.diff == pytest.approx(float((a - b).mean()))
    assert (d.high - d.low) == pytest.approx(2 * 1.96 * se, rel=0.15)  # bootstrap noise at 2000 resamples: a few %
    assert d.low < 0.1 < d.high


def test_a_sweep_won_at_its_edge_is_extended_past_it():
    import quality_text

    def swept(accuracies: dict[float, float]) -> dict:
        return {("t", "m", lr, 0): {"learning_rate": lr, "validation_accuracy": a} for lr, a in accuracies.items()}

    grid = [1e-3, 2e-3, 5e-3]
    assert quality_text._extend(grid, swept({1e-3: 0.1, 2e-3: 0.3, 5e-3: 0.2}), "t", "m", 0) is None
    assert grid == [1e-3, 2e-3, 5e-3]  # an interior winner leaves the grid alone
    assert quality_text._extend(grid, swept({1e-3: 0.4, 2e-3: 0.3, 5e-3: 0.2}), "t", "m", 0) == 5e-4
    assert grid == [5e-4, 1e-3, 2e-3, 5e-3]  # one geometric step (×½) below the winning bottom edge
    top = [1e-4, 3e-4, 1e-3]
    assert quality_text._extend(top, swept({1e-4: 0.0, 3e-4: 0.1, 1e-3: 0.2}), "t", "m", 0) == 3e-3
    assert top[-1] == 3e-3
