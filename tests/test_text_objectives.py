"""Forward process (masking) and the masked-diffusion SFT loss, on a tiny stand-in denoiser."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import peft
import pytest
import torch
from builders import perturb_
from torch import nn
from transformers import PretrainedConfig

import nara_diffusion as nd
from nara_diffusion.text.masking import MaskedBatch, mask_answers, sample_t
from nara_diffusion.text.objectives import (
    is_noise_conditioned,
    logits_at,
    masked_diffusion_loss,
    sft_loss,
    supports_logits_positions,
)

VOCAB, MASK_ID = 13, 12


class TinyDenoiser(nn.Module):
    """Embedding, a context-mixing ``q_proj`` and a head; logits only at ``logits_positions`` when given."""

    def __init__(self, seed: int = 0, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = PretrainedConfig(vocab_size=VOCAB, mask_token_id=MASK_ID)
        self.embed = nn.Embedding(VOCAB, d)
        self.q_proj = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return h + torch.tanh(self.q_proj(h)).mean(dim=1, keepdim=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        logits_positions: Optional[torch.Tensor] = None,
    ) -> SimpleNamespace:
        h = self.hidden(input_ids)
        return SimpleNamespace(logits=self.head(h if logits_positions is None else h[logits_positions]))


class FullLogitsDenoiser(TinyDenoiser):
    """The same network without ``logits_positions`` support."""

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.hidden(input_ids)))


def batch_of(prompt_lengths: list[int], seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clean ids (never the mask id) and prompt lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK_ID, (len(prompt_lengths), seq_len), generator=gen)
    return ids, torch.tensor(prompt_lengths)


def run(ids, prompts, seed=0, **kw) -> MaskedBatch:
    return mask_answers(ids, prompts, mask_token_id=MASK_ID, generator=torch.Generator().manual_seed(seed), **kw)


def hand_loss(logits: torch.Tensor, x0: torch.Tensor, out: MaskedBatch) -> torch.Tensor:
    """Σ over masked positions of −log softmax(logits)[x0] / t_b / answer_len_b, averaged over the batch, by loops."""
    total = torch.zeros(())
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            if out.masked[b, i]:
                ce = -torch.log_softmax(logits[b, i].double(), dim=-1)[x0[b, i]]
                total = total + ce / float(out.t[b]) / int(out.answer_lengths[b])
    return (total / x0.shape[0]).float()


# -- the forward process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["uniform", "bernoulli"])
def test_masking_never_touches_the_prompt(mode):
    ids, prompts = batch_of([0, 3, 7, 19, 10, 1], 20)
    for seed in range(20):
        out = run(ids, prompts, seed, mode=mode)
        for b, p in enumerate(prompts.tolist()):
            assert not out.masked[b, :p].any()
            assert torch.equal(out.noisy_ids[b, :p], ids[b, :p])
        assert (out.noisy_ids[out.masked] == MASK_ID).all()
        assert torch.equal(out.noisy_ids[~out.masked], ids[~out.masked])
        assert out.answer_lengths.tolist() == [20, 17, 13, 1, 10, 19]


def test_uniform_mode_masks_exactly_ceil_t_times_answer_length():
    ids, prompts = batch_of([0, 3, 7, 19, 10, 1, 15, 2], 20)
    for seed in range(50):
        out = run(ids, prompts, seed)
        n = out.answer_lengths.tolist()
        expected = [min(max(math.ceil(float(t) * nb), 1), nb) for t, nb in zip(out.t.tolist(), n, strict=True)]
        assert out.num_masked.tolist() == expected
    assert run(ids, prompts, t=1.0).num_masked.tolist() == (20 - prompts).tolist()
    assert run(ids, prompts, t=1e-6).num_masked.tolist() == [1] * 8  # clamped to at least one


def test_uniform_mode_picks_every_answer_position_equally_often():
    ids, prompts = batch_of([2] * 4000, 10)
    frequency = run(ids, prompts, t=0.25).masked.float().mean(dim=0)  # k = ceil(0.25 · 8) = 2 of 8
    assert frequency[:2].eq(0).all()
    torch.testing.assert_close(frequency[2:], torch.full((8,), 0.25), atol=0.03, rtol=0)


def test_bernoulli_mode_masked_fraction_concentrates_near_t():
    ids, prompts = batch_of([5] * 8, 5005)
    out = run(ids, prompts, mode="bernoulli")
    fraction = out.masked.sum(dim=1) / 5000
    tolerance = 5 * torch.sqrt(out.t * (1 - out.t) / 5000) + 1e-3
    assert ((fraction - out.t).abs() < tolerance).all()
    k = torch.ceil(out.t.double() * 5000).long()
    assert not torch.equal(out.num_masked, k)  # not the exact count of the uniform mode


def test_t_is_in_eps_to_one_and_configurable():
    t = sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert t.min() >= 1e-3 and t.max() < 1
    assert abs(float(t.mean()) - 0.5005) < 0.01
    ids, prompts = batch_of([1] * 2000, 4)
    t = run(ids, prompts, eps=0.4).t
    assert t.min() >= 0.4 and t.max() < 1 and abs(float(t.mean()) - 0.7) < 0.02


def test_masking_is_reproducible_with_a_seed():
    ids, prompts = batch_of([3, 5, 0], 16)
    for mode in ("uniform", "bernoulli"):
        a, b, c = run(ids, prompts, 7, mode=mode), run(ids, prompts, 7, mode=mode), run(ids, prompts, 8, mode=mode)
        assert torch.equal(a.masked, b.masked) and torch.equal(a.t, b.t) and torch.equal(a.noisy_ids, b.noisy_ids)
        assert not torch.equal(a.t, c.t)


def test_masking_rejects_bad_input():
    ids, prompts = batch_of([3, 5], 8)
    with pytest.raises(ValueError, match="Unknown masking mode"):
        run(ids, prompts, mode="random")
    for eps in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="eps must be in"):
            run(ids, prompts, eps=eps)
    with pytest.raises(ValueError, match="answer region is not empty"):
        run(ids, torch.tensor([3, 8]))
    with pytest.raises(ValueError, match="one per example"):
        run(ids, torch.tensor([3]))
    with pytest.raises(ValueError, match=r"t must be in \(0, 1\]"):
        run(ids, prompts, t=torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        run(ids[0], prompts)


# -- the loss -----------------------------------------------------------------------------------------------------
def test_loss_equals_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen)
    x0 = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    masked = torch.tensor([[False, True, True, False], [False, False, False, True]])
    t, n = torch.tensor([0.5, 0.25]), torch.tensor([3, 2])

    def ce(b: int, i: int) -> torch.Tensor:
        return -torch.log_softmax(logits[b, i], dim=-1)[x0[b, i]]

    per_example = torch.stack([(ce(0, 1) + ce(0, 2)) / 0.5 / 3, ce(1, 3) / 0.25 / 2])
    torch.testing.assert_close(masked_diffusion_loss(logits, x0, masked, t, n), per_example.mean())
    torch.testing.assert_close(masked_diffusion_loss(logits[masked], x0, masked, t, n), per_example.mean())
    torch.testing.assert_close(masked_diffusion_loss(logits, x0, masked, t, n, reduction="none"), per_example)
    nothing_masked = masked.clone()
    nothing_masked[1] = False  # (Bernoulli mode can mask nothing): contributes 0, still counts in the mean
    torch.testing.assert_close(masked_diffusion_loss(logits, x0, nothing_masked, t, n), per_example[0] / 2)
    with pytest.raises(ValueError, match="N = 3 masked positions"):
        masked_diffusion_loss(logits[masked][:2], x0, masked, t, n)


def test_sft_loss_of_a_bare_model_matches_the_hand_computation_and_trains_every_weight():
    model = TinyDenoiser()
    ids, prompts = batch_of([2, 5, 0], 9)
    loss, out = sft_loss(model, ids, prompts, mask_token_id=MASK_ID, generator=torch.Generator().manual_seed(3))
    assert isinstance(out, MaskedBatch) and loss.shape == ()
    with torch.no_grad():
        expected = hand_loss(model(out.noisy_ids).logits, ids, out)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_logits_at_masked_positions_only_give_the_same_loss_as_full_logits():
    ids, prompts = batch_of([2, 5, 0, 7], 12)
    losses = []
    for model, positions in [(TinyDenoiser(), True), (TinyDenoiser(), False), (FullLogitsDenoiser(), None)]:
        gen = torch.Generator().manual_seed(5)
        losses.append(sft_loss(model, ids, prompts, mask_token_id=MASK_ID, generator=gen, logits_positions=positions))
    assert torch.equal(losses[0].batch.masked, losses[1].batch.masked)
    torch.testing.assert_close(losses[0].loss, losses[1].loss)
    torch.testing.assert_close(losses[0].loss, losses[2].loss)
    assert supports_logits_positions(TinyDenoiser()) and not supports_logits_positions(FullLogitsDenoiser())


def test_logits_at_requests_only_the_selected_rows_and_gathers_full_logits_otherwise():
    model, calls = TinyDenoiser(), []
    model.register_forward_hook(lambda module, args, output: calls.append(tuple(output.logits.shape)))
    ids, positions = batch_of([0, 0], 6)[0], torch.zeros(2, 6, dtype=torch.bool)
    positions[0, 1] = positions[1, 4] = positions[1, 5] = True
    rows = logits_at(model, ids, positions)
    full = logits_at(model, ids, positions, logits_positions=False)
    assert calls == [(3, VOCAB), (2, 6, VOCAB)]
    torch.testing.assert_close(rows, full)
    torch.testing.assert_close(rows, model(ids).logits[positions])


def test_nara_adapter_receives_lambda_equal_to_t_and_gets_gradients():
    model = nd.get_nara_model(TinyDenoiser(), nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    perturb_(model)  # B and the hypernetwork's last layer start at zero, which would zero some gradients
    assert is_noise_conditioned(model) and supports_logits_positions(model)
    seen = []
    nd.get_adapter(model).embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    ids, prompts = batch_of([2, 5, 0, 3], 10)
    loss, out = sft_loss(model, ids, prompts, mask_token_id=MASK_ID, generator=torch.Generator().manual_seed(1))
    assert len(seen) == 1 and torch.equal(seen[0], out.t)  # the sampled t, not the realised mask fraction
    assert not torch.equal(out.t, out.num_masked / out.answer_lengths)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("nara_hypernet" in n for n in trainable) and any("nara_A" in n for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_lora_and_wrapped_models_are_handled():
    lora = peft.get_peft_model(TinyDenoiser(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert not is_noise_conditioned(lora) and supports_logits_positions(lora)
    ids, prompts = batch_of([2, 5], 8)
    loss, _ = sft_loss(lora, ids, prompts, mask_token_id=MASK_ID)  # the stand-in rejects a noise_level keyword
    loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)
    nara = nd.get_nara_model(TinyDenoiser(), nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    wrapped = nn.DataParallel(nara)
    assert is_noise_conditioned(wrapped) and is_noise_conditioned(nara.base_model)
    assert not is_noise_conditioned(TinyDenoiser()) and not is_noise_conditioned(nn.DataParallel(TinyDenoiser()))
    loss, _ = sft_loss(wrapped, ids, prompts, mask_token_id=MASK_ID)
    assert torch.isfinite(loss)
