"""LIFT and GIFT objectives, on a hand-built model whose per-token confidences are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nara_diffusion as nd
from nara_diffusion.text.objectives import choose_lift_modes, gift_loss, lift_loss, lift_sft_loss, sample_rho

MASK, VOCAB = 9, 10


class KnownConfidence(nn.Module):
    """Logits put ``strength[b, i]`` on the true token ``x0[b, i]`` and 0 elsewhere, whatever the input: the
    confidence of every token is known in advance. Records the input of every call."""

    def __init__(self, x0: torch.Tensor, strength: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.strength = x0, strength
        self.scale = nn.Parameter(torch.ones(()))
        self.q_proj = nn.Linear(4, 4)  # something for NaRA to adapt
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids, logits_positions=None):
        self.calls.append(input_ids.clone())
        logits = F.one_hot(self.x0, VOCAB).float() * self.strength.unsqueeze(-1) * self.scale
        logits = logits + 0 * self.q_proj(torch.zeros(input_ids.shape[0], 4)).sum()
        out = logits if logits_positions is None else logits[logits_positions]
        return type("Out", (), {"logits": out})()


def _setup(seed=0, L=40, prompt=4):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (1, L), generator=gen)
    strength = torch.randn(1, L, generator=gen) * 3
    superset = torch.zeros(1, L, dtype=torch.bool)
    superset[0, prompt:] = torch.rand(L - prompt, generator=gen) < 0.9
    ids = x0.masked_fill(superset, MASK)
    labels = x0.masked_fill(~superset, -100)
    return x0, strength, superset, ids, labels, prompt


def _gold_logp(strength):
    # log softmax of a one-hot logit row with value s on the gold token
    return strength - torch.log(torch.exp(strength) + (VOCAB - 1))


@pytest.mark.parametrize("t,rho,mode", [(0.8, 0.15, "top"), (0.2, 0.5, "bottom")])
def test_top_and_bottom_k_select_exactly_the_most_and_least_confident(t, rho, mode):
    x0, strength, superset, ids, labels, prompt = _setup()
    model = KnownConfidence(x0, strength)
    assert choose_lift_modes(torch.tensor([t])) == [mode]
    loss = lift_loss(model, ids, labels, torch.tensor([t]), torch.tensor([rho]), [prompt], mode=mode)
    assert len(model.calls) == 2
    trained = model.calls[1] == MASK
    n = int(superset.sum())
    k = round(n * t / (t + rho))
    conf = _gold_logp(strength)[superset]
    order = conf.argsort(descending=(mode == "top"))[:k]
    expected = torch.zeros_like(superset)
    expected[superset.nonzero(as_tuple=True)[0][order], superset.nonzero(as_tuple=True)[1][order]] = True
    assert torch.equal(trained, expected)
    # refill: the unselected superset positions hold the true tokens again
    assert torch.equal(model.calls[1][~trained], x0[~trained])
    # the loss is the authors' formula for one example: Σ_selected CE / t / (L - prompt)
    hand = (-_gold_logp(strength)[expected]).sum() / t / (x0.shape[1] - prompt)
    torch.testing.assert_close(loss, hand)


def test_random_mode_keeps_a_random_subset_of_the_right_size_and_one_forward():
    x0, strength, superset, ids, labels, prompt = _setup()
    t, rho = 0.5, 0.3
    assert choose_lift_modes(torch.tensor([t])) == ["random"]
    kept = []
    for seed in range(2):
        model = KnownConfidence(x0, strength)
        lift_loss(
            model,
            ids,
            labels,
            torch.tensor([t]),
            torch.tensor([rho]),
            [prompt],
            mode="random",
            generator=torch.Generator().manual_seed(seed),
        )
        assert len(model.calls) == 1  # no scoring forward in the vanilla mode
        kept.append(model.calls[0] == MASK)
        assert int(kept[-1].sum()) == round(int(superset.sum()) * t / (t + rho))
        assert not (kept[-1] & ~superset).any()
    assert not torch.equal(kept[0], kept[1])


def test_approximate_uses_one_forward_on_the_superset_view():
    x0, strength, _superset, ids, labels, prompt = _setup()
    model = KnownConfidence(x0, strength)
    loss = lift_loss(
        model, ids, labels, torch.tensor([0.8]), torch.tensor([0.1]), [prompt], mode="top", approximate=True
    )
    assert len(model.calls) == 1 and torch.equal(model.calls[0], ids)
    loss.backward()
    assert model.scale.grad is not None  # the gradient flows through the scoring forward


def test_refill_leaves_a_mask_ratio_near_t():
    torch.manual_seed(0)
    L, prompt = 400, 10
    x0 = torch.randint(0, MASK, (1, L))
    model = KnownConfidence(x0, torch.randn(1, L))
    gen = torch.Generator().manual_seed(3)
    for t_target in (0.15, 0.5, 0.85):
        model.calls.clear()
        superset_t = min(1.0, t_target + 0.1)
        superset = torch.zeros(1, L, dtype=torch.bool)
        superset[0, prompt:] = torch.rand(L - prompt, generator=gen) < superset_t
        lift_loss(
            model,
            x0.masked_fill(superset, MASK),
            x0.masked_fill(~superset, -100),
            torch.tensor([t_target]),
            torch.tensor([0.1]),
            [prompt],
            mode="top",
        )
        ratio = (model.calls[-1][0, prompt:] == MASK).float().mean().item()
        assert abs(ratio - t_target) < 0.06


def test_mode_choice_and_rho():
    t = torch.tensor([0.1, 0.3, 0.34, 0.5, 0.66, 0.7, 0.95])
    assert choose_lift_modes(t) == ["bottom", "bottom", "random", "random", "random", "top", "top"]
    assert choose_lift_modes(torch.tensor([0.4, 0.6]), variant="lift2") == ["bottom", "top"]
    mixed = choose_lift_modes(torch.full((64,), 0.9), policy="random", generator=torch.Generator().manual_seed(0))
    assert set(mixed) == {"top", "bottom", "random"}
    t_raw = torch.rand(1000, dtype=torch.float64)
    rho = sample_rho(t_raw)
    wide = (1 - t_raw) > 0.1
    assert (rho[wide] >= 0.1).all() and (rho <= 1 - t_raw).all() and (rho >= 0).all()
    assert (sample_rho(t_raw, dist="paper")[wide] < 0.1).any()
    with pytest.raises(ValueError, match="variant"):
        choose_lift_modes(t, variant="lift4")


def test_lift_step_with_nara_passes_the_realised_mask_ratio_and_trains_the_adapter():
    x0, strength, *_ = _setup(L=30)
    base = KnownConfidence(x0, strength)
    model = nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    seen = []
    nd.get_adapter(model).embedding.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    loss = lift_sft_loss(model, x0, [4], mask_token_id=MASK, generator=torch.Generator().manual_seed(1))
    answer = x0.shape[1] - 4
    realised = [((ids[0, 4:] == MASK).sum() / answer).item() for ids in base.calls]
    assert len(seen) == len(base.calls) and [s.item() for s in seen] == pytest.approx(realised)
    loss.backward()
    assert nd.get_adapter(model).generator.layers[0].weight.grad is not None


def test_gift_masks_by_entropy_and_weights_by_the_token_rate():
    torch.manual_seed(0)
    L, prompt = 300, 20
    x0 = torch.randint(0, MASK, (1, L))
    model = KnownConfidence(x0, torch.zeros(1, L))  # uniform predictions: every token has the same entropy
    loss = gift_loss(model, x0, [prompt], mask_token_id=MASK, generator=torch.Generator().manual_seed(2))
    assert len(model.calls) == 2 and (model.calls[0][0, prompt:] == MASK).all()
    masked = model.calls[1] == MASK
    # with equal entropies t_i = t for every token, so CE/t_i is the same for all: loss = log(V) / t
    t = masked[0, prompt:].float().mean().item()
    assert loss.item() == pytest.approx(math.log(VOCAB) / t, rel=0.25)
    assert not masked[0, :prompt].any()


def test_gift_masks_uncertain_tokens_more_often():
    torch.manual_seed(0)
    L, prompt = 400, 0
    x0 = torch.randint(0, MASK, (1, L))
    strength = torch.zeros(1, L)
    strength[0, ::2] = 8.0  # even positions: confident, low entropy
    model = KnownConfidence(x0, strength)
    even, odd = 0, 0
    for seed in range(10):
        model.calls.clear()
        gift_loss(model, x0, [prompt], mask_token_id=MASK, generator=torch.Generator().manual_seed(seed))
        masked = model.calls[1][0] == MASK
        even, odd = even + int(masked[::2].sum()), odd + int(masked[1::2].sum())
    assert odd > 1.5 * even
