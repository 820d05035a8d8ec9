"""The sampler: LLaDA's reverse process token for token, λ at every step, early termination, batching, noise bins."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import peft
import pytest
import torch
from builders import EOS, MASK, PAD, V, make_tiny_base, noise_bins, perturb_, tiny_llada, tiny_llada_config
from reference import computed
from torch import nn

import nara_diffusion as nd
from nara_diffusion.text.llada import LLaDAModelLM
from nara_diffusion.text.noise_bins import noise_bin_count
from nara_diffusion.text.sampler import Denoiser, MaskRatio, generate, gumbel_argmax, transfer_schedule


def reference_generate(
    model: nn.Module,
    prompt: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    cfg_scale: float = 0.0,
) -> torch.Tensor:
    """LLaDA's reference generate() (ML-GSAI/LLaDA, generate.py), greedy with low-confidence remasking, written
    plainly from its description: full-canvas forward, softmax confidence, top-k per example, one step at a time."""
    batch, width = prompt.shape
    x = torch.full((batch, width + gen_length), MASK, dtype=torch.long)
    x[:, :width] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(batch, gen_length, dtype=attention_mask.dtype)], 1)
    prompt_index = x != MASK
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for b in range(num_blocks):
        start, end = width + b * block_length, width + (b + 1) * block_length
        masked = (x[:, start:end] == MASK).sum(1)
        counts = [[int(m) // per_block + (i < int(m) % per_block) for i in range(per_block)] for m in masked]
        for i in range(per_block):
            mask_index = x == MASK
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[prompt_index] = MASK
                mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                logits = model(torch.cat([x, uncond]), attention_mask=mask2).logits
                cond, un = torch.chunk(logits, 2, dim=0)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            x0 = logits.argmax(-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-math.inf))
            for j in range(batch):
                _, chosen = torch.topk(confidence[j], k=counts[j][i])
                x[j, chosen] = x0[j, chosen]
    return x


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


class Scripted(nn.Module):
    """A model whose logits are written by hand: at position p of a row whose first token is ``key``, the logit of
    ``tables[key][0][p]`` is ``tables[key][1][p]`` and every other logit is 0. Records each input it is called on."""

    def __init__(self, tables: dict[int, tuple[list[int], list[float]]]) -> None:
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=MASK, eos_token_id=EOS, max_sequence_length=64)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tables = tables
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> SimpleNamespace:
        self.calls.append(input_ids.clone())
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, V)
        for b in range(batch):
            tokens, strengths = self.tables[int(input_ids[b, 0])]
            logits[b, torch.arange(length), torch.tensor(tokens[:length])] = torch.tensor(strengths[:length])
        return SimpleNamespace(logits=logits)


# -- the reverse process ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gen_length", "steps", "block_length", "cfg_scale", "padded"),
    [
        (16, 16, 4, 0.0, False),
        (16, 8, 8, 0.0, True),
        (15, 9, 5, 0.0, False),
        (12, 6, 12, 0.0, False),
        (8, 8, 4, 1.5, True),
    ],
)
def test_matches_llada_reference_token_for_token(gen_length, steps, block_length, cfg_scale, padded):
    model = tiny_llada(seed=3)
    if padded:
        ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11, 12]])
    else:
        ids, mask = torch.tensor([[5, 6, 7, 2], [8, 9, 10, 11]]), None
    settings = {"steps": steps, "gen_length": gen_length, "block_length": block_length, "cfg_scale": cfg_scale}
    expected = reference_generate(model, ids, mask, **settings)
    ours = generate(model, ids, attention_mask=mask, **settings)
    # Token ids may be compared exactly although the logits are not bit-identical (ours are gathered rows, the
    # reference's the full canvas: float32 rounding ≲ 1e-5): on these prompts the smallest top-2 logit gap at a masked
    # position is 1.6e-3 and the smallest confidence gap at a top-k cut 1.2e-3, two orders of magnitude above it.
    assert torch.equal(ours, expected)
    assert len(set(ours[:, ids.shape[1] :].flatten().tolist())) > 3  # the model is not trivially constant
    assert MASK not in ours.tolist()


def test_commits_the_prescribed_tokens_and_positions_block_by_block():
    # prompt of 3, gen 8 in blocks of 4, 4 steps: 2 steps per block, 2 tokens per step, most confident first
    tokens = [0, 0, 0, 2, 3, 4, 5, 6, 7, 8, 9]
    strengths = [0, 0, 0, 1.0, 4.0, 2.0, 3.0, 5.0, 1.0, 3.0, 2.0]
    model = Scripted({4: (tokens, strengths)})
    out = generate(model, torch.tensor([[4, 5, 6]]), gen_length=8, steps=4, block_length=4)
    m = MASK
    expected_inputs = [
        [m, m, m, m, m, m, m, m],
        [m, 3, m, 5, m, m, m, m],  # block 0: strengths 1,4,2,3 → positions 1 and 3 first
        [2, 3, 4, 5, m, m, m, m],
        [2, 3, 4, 5, 6, m, 8, m],  # block 1: strengths 5,1,3,2 → positions 0 and 2 first
    ]
    assert [c[0, 3:].tolist() for c in model.calls] == expected_inputs
    assert out[0, 3:].tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert out[0, :3].tolist() == [4, 5, 6]


def test_transfer_schedule_is_llada_linear_schedule():
    assert transfer_schedule(8, 4) == [2, 2, 2, 2]
    assert transfer_schedule(5, 3) == [2, 2, 1]
    assert transfer_schedule(4, 4) == [1, 1, 1, 1]
    assert sum(transfer_schedule(37, 5)) == 37


def test_random_remasking_commits_the_scheduled_count_each_step():
    model = Scripted({4: ([0] * 3 + list(range(2, 10)), [0.0] * 3 + [1.0] * 8)})
    out = generate(model, torch.tensor([[4, 5, 6]]), gen_length=8, steps=4, block_length=8, remasking="random")
    masked = [int((c[0, 3:] == MASK).sum()) for c in model.calls]
    assert masked == [8, 6, 4, 2]
    assert out[0, 3:].tolist() == list(range(2, 10))


def test_threshold_commits_all_above_tau_and_at_least_one():
    # confidences (V=20): strength 6 → 0.955, 1 → 0.125, 5 → 0.886, 0.5 → 0.080
    table = ([0, 0, 2, 3, 4, 5], [0, 0, 6.0, 1.0, 5.0, 0.5])
    strict = Scripted({4: table})
    out = generate(strict, torch.tensor([[4, 5]]), gen_length=4, steps=1, block_length=4, threshold=0.9)
    assert [c[0, 2:].tolist() for c in strict.calls] == [
        [MASK] * 4,
        [2, MASK, MASK, MASK],
        [2, MASK, 4, MASK],  # nothing above 0.9 any more: the most confident one
        [2, 3, 4, MASK],
    ]
    loose = Scripted({4: table})
    out2 = generate(loose, torch.tensor([[4, 5]]), gen_length=4, steps=1, block_length=4, threshold=0.5)
    assert len(loose.calls) == 3 and loose.calls[1][0, 2:].tolist() == [2, MASK, 4, MASK]
    assert torch.equal(out, out2)


def test_banned_tokens_are_never_proposed_and_suppressed_ones_come_last():
    table = ([0, 0, 7, 7, 7, 7], [0, 0, 3.0, 3.0, 3.0, 3.0])
    banned = Scripted({4: table})
    out = generate(banned, torch.tensor([[4, 5]]), gen_length=4, steps=4, banned_tokens=[7])
    assert 7 not in out[0, 2:].tolist() and MASK not in out[0, 2:].tolist()
    # EOS is the most confident proposal at position 0 but is suppressed: committed last
    suppressed = Scripted({4: ([0, 0, EOS, 2, 3, 4], [0, 0, 9.0, 3.0, 2.0, 1.0])})
    out = generate(suppressed, torch.tensor([[4, 5]]), gen_length=4, steps=4, suppress_tokens=[EOS])
    first_committed = [
        int((c[0, 2:] != MASK).nonzero()[0]) if (c[0, 2:] != MASK).any() else None for c in suppressed.calls
    ]
    assert first_committed == [None, 1, 1, 1]  # position 0 (EOS) still masked until the last step
    assert out[0, 2:].tolist() == [EOS, 2, 3, 4]


# -- λ at every step --------------------------------------------------------------------------------------------------
def _nara_spy(base: nn.Module) -> tuple[nn.Module, list[torch.Tensor]]:
    model = nd.get_nara_model(base, nd.NaRAConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    seen: list[torch.Tensor] = []
    # the sampler marks its λ as computed (in range by construction: no host check on accelerators)
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(computed(kw["noise_level"]).clone()), with_kwargs=True)
    return model, seen


@pytest.mark.parametrize("rule", ["generation", "block", "sequence"])
def test_noise_level_at_each_step_follows_the_rule(rule):
    model, seen = _nara_spy(tiny_llada())
    ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11, 12]])
    generate(model, ids, attention_mask=mask, gen_length=8, steps=8, block_length=4, noise_rule=rule, till_eos=False)
    assert len(seen) == 8
    for j, lam in enumerate(seen):
        left = 8 - j  # masks left in the generation before step j (one token per step)
        if rule == "generation":
            expected = [left / 8, left / 8]
        elif rule == "block":
            expected = [(4 - j % 4) / 4] * 2
        else:
            expected = [left / (3 + 8), left / (5 + 8)]  # padding is not part of the sequence
        torch.testing.assert_close(lam, torch.tensor(expected))


def test_noise_level_under_cfg_counts_the_masked_prompt_for_the_sequence_rule():
    model, seen = _nara_spy(tiny_llada())
    ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11, 12]])
    generate(
        model, ids, attention_mask=mask, gen_length=4, steps=4, block_length=4, cfg_scale=1.0, noise_rule="sequence"
    )
    for j, lam in enumerate(seen):
        left = 4 - j
        cond = [left / 7, left / 9]
        uncond = [(left + 3) / 7, (left + 5) / 9]
        torch.testing.assert_close(lam, torch.tensor(cond + uncond))


def test_a_lora_or_base_model_gets_no_noise_level():
    base = tiny_llada()
    seen = []
    base.register_forward_pre_hook(lambda m, a, kw: seen.append("noise_level" in kw), with_kwargs=True)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    generate(lora, torch.tensor([[5, 6]]), gen_length=4, steps=4)
    assert seen == [False] * 4


def test_mask_ratio_bins_are_exact():
    ratio = MaskRatio(torch.tensor([0, 1, 3, 5, 12]), torch.tensor([5, 5, 5, 5, 12]))
    assert ratio.bin(5).tolist() == [1, 1, 3, 5, 5]
    assert math.ceil(float(torch.tensor(3 / 5, dtype=torch.float32)) * 5) == 4  # what float rounding would give


# -- early termination ----------------------------------------------------------------------------------------------
def test_early_termination_decodes_one_more_block_then_fills_eos_per_example():
    gen = 16
    row_a = ([0, 0, 7, EOS] + [7] * (gen - 2), [0.0, 0.0] + [5.0] * gen)  # EOS in block 0
    row_b = ([0, 0] + [9] * gen, [0.0, 0.0] + [5.0] * gen)  # never EOS
    model = Scripted({5: row_a, 8: row_b})
    ids = torch.tensor([[5, 6], [8, 6]])
    out = generate(model, ids, gen_length=gen, steps=gen, block_length=4, till_eos=True)
    assert out[0, 2:].tolist() == [7, EOS, 7, 7] + [7] * 4 + [EOS] * 8
    assert out[1, 2:].tolist() == [9] * gen
    assert [c.shape[0] for c in model.calls] == [2] * 8 + [1] * 8  # row a left the batch after block 1

    alone = Scripted({5: row_a})
    generate(alone, ids[:1], gen_length=gen, steps=gen, block_length=4, till_eos=True)
    assert len(alone.calls) == 8  # nothing left after block 1: the loop stops

    off = Scripted({5: row_a, 8: row_b})
    out = generate(off, ids, gen_length=gen, steps=gen, block_length=4, till_eos=False)
    assert out[0, 2:].tolist() == [7, EOS] + [7] * 14 and len(off.calls) == 16


def test_early_termination_is_on_by_default_for_nara_only():
    base = tiny_llada(eos_always=True)
    calls = []
    base.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = generate(base, torch.tensor([[5, 6]]), gen_length=16, steps=16, block_length=4)
    assert len(calls) == 16 and out[0, 2:].tolist() == [EOS] * 16
    calls.clear()
    nara = nd.get_nara_model(base, nd.NaRAConfig(r=4, target_modules=["q_proj"])).eval()
    out = generate(nara, torch.tensor([[5, 6]]), gen_length=16, steps=16, block_length=4)
    assert len(calls) == 8 and out[0, 2:].tolist() == [EOS] * 16


# -- determinism and batching ---------------------------------------------------------------------------------------
def test_greedy_is_deterministic_and_sampling_follows_the_generator():
    model = tiny_llada(seed=1)
    ids = torch.tensor([[5, 6, 7]])
    settings = {"gen_length": 12, "steps": 6, "block_length": 4}
    assert torch.equal(generate(model, ids, **settings), generate(model, ids, **settings))
    draws = [
        generate(model, ids, temperature=1.0, generator=torch.Generator().manual_seed(s), **settings) for s in (0, 0, 1)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_max_samples_exactly_from_the_tempered_softmax(temperature):
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0]).expand(40_000, 4)
    draws = gumbel_argmax(logits, temperature, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0].double() / temperature, 0), atol=0.01, rtol=0)
    assert torch.equal(gumbel_argmax(logits[:3], 0.0), torch.tensor([1, 1, 1]))


def _one_by_one(model: nn.Module, prompts: list[list[int]], **settings) -> list[list[int]]:
    return [generate(model, torch.tensor([p]), **settings)[0, len(p) :].tolist() for p in prompts]


@pytest.mark.parametrize("adapter", ["none", "nara"])
def test_batched_prompts_of_different_lengths_match_one_by_one(adapter):
    model = tiny_llada(seed=2)
    if adapter == "nara":
        model = nd.get_nara_model(model, nd.NaRAConfig(r=4, target_modules=["q_proj", "v_proj", "attn_out"])).eval()
        perturb_(model, scale=0.3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17]]
    settings = {"gen_length": 12, "steps": 12, "block_length": 4, "noise_rule": "sequence", "till_eos": False}
    ids, mask = left_padded(prompts)
    batched = generate(model, ids, attention_mask=mask, **settings)
    assert batched[:, ids.shape[1] :].tolist() == _one_by_one(model, prompts, **settings)
    assert torch.equal(batched[:, : ids.shape[1]], ids)  # prompt and padding returned unchanged


# -- the noise-bin baseline -----------------------------------------------------------------------------------------
def test_noise_bin_set_switches_adapters_at_the_right_steps():
    model = noise_bins(tiny_llada(), [1, 2, 3])
    model.set_adapter("noise_bin_2")
    active = []
    model.get_base_model().register_forward_pre_hook(lambda m, a: active.append(model.active_adapter))
    generate(model, torch.tensor([[5, 6]]), gen_length=12, steps=12, block_length=12)
    # λ before step i is (12 - i)/12; bin ⌈3λ⌉: 12..9 masks → 3, 8..5 → 2, 4..1 → 1
    assert active == ["noise_bin_3"] * 4 + ["noise_bin_2"] * 4 + ["noise_bin_1"] * 4
    assert model.active_adapter == "noise_bin_2"  # restored
    assert noise_bin_count(model) == 3


def test_noise_bin_rows_in_different_bins_match_one_by_one():
    model = noise_bins(tiny_llada(seed=4), [1, 2, 3, 4])
    prompts = [[5, 6], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    settings = {"gen_length": 8, "steps": 8, "block_length": 4, "noise_rule": "sequence"}
    ids, mask = left_padded(prompts)
    batched = generate(model, ids, attention_mask=mask, **settings)
    assert batched[:, ids.shape[1] :].tolist() == _one_by_one(model, prompts, **settings)


def test_noise_bin_set_with_a_missing_bin_is_refused():
    model = noise_bins(tiny_llada(), [1, 3])
    with pytest.raises(ValueError, match="noise_bin_2"):
        generate(model, torch.tensor([[5, 6]]), gen_length=4, steps=4)


def test_denoiser_restores_train_mode():
    model = tiny_llada().train()
    with Denoiser(model):
        assert not model.training
    assert model.training


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gen_length": 10, "steps": 10, "block_length": 4}, "multiple of block_length"),
        ({"gen_length": 16, "steps": 6, "block_length": 4}, "divisible by the number of blocks"),
        ({"gen_length": 8, "steps": 16, "block_length": 8}, "exceeds gen_length"),
        ({"gen_length": 64, "steps": 64}, "maximum length 64"),
        ({"input_ids": torch.zeros((1, 0), dtype=torch.long)}, "Empty prompt"),
        ({"attention_mask": torch.tensor([[0, 0, 0]])}, "Empty prompt"),
        ({"attention_mask": torch.tensor([[1, 1, 0]])}, "left"),
        ({"input_ids": torch.tensor([[5, MASK, 7]])}, "mask token"),
        ({"remasking": "top_k"}, "remasking"),
        ({"noise_rule": "time"}, "noise_rule"),
        ({"threshold": 0.0}, "threshold"),
        ({"temperature": -1.0}, "temperature"),
        ({"steps": 0}, "positive integer"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, message):
    settings = {"input_ids": torch.tensor([[5, 6, 7]]), "gen_length": 8, "steps": 8, "block_length": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tiny_llada(), settings.pop("input_ids"), **settings)


# -- training the noise-bin baseline --------------------------------------------------------------------------------
def test_sample_t_in_bin_stays_in_the_bin():
    from nara_diffusion.text.noise_bins import sample_t_in_bin

    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 4):
        t = sample_t_in_bin(1000, k, 4, eps=1e-3, generator=gen)
        assert float(t.min()) >= max(1e-3, (k - 1) / 4) and float(t.max()) <= k / 4
        assert float(t.max() - t.min()) > 0.2  # spread over the bin


def test_multi_lora_finetune_trains_each_adapter_on_its_bin(tmp_path, monkeypatch):
    import nara_diffusion.text.finetune as finetune
    from nara_diffusion.text.loading import load_adapter

    tok = make_tiny_base().char_tokenizer()
    config = tiny_llada_config(
        tok, d_model=16, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=32, max_sequence_length=128,
        rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LLaDAModelLM(config)
    seen = []
    real_loss = finetune.sft_loss

    def spy_loss(*args, t=None, **kwargs):
        seen.append(t.clone())
        return real_loss(*args, t=t, **kwargs)

    monkeypatch.setattr(finetune, "sft_loss", spy_loss)
    run = finetune.FinetuneConfig(
        model="unused",
        dataset=str(Path(__file__).parents[1] / "examples" / "llada" / "data" / "toy_addition.json"),
        output_dir=str(tmp_path),
        adapter="multi-lora",
        bins=3,
        r=2,
        max_length=80,
        batch_size=4,
        grad_accum=1,
        max_steps=2,
        eval_every=0,
        val_size=0,
        report_to="none",
    )
    result = finetune.run_finetune(run, base, tok)
    assert result.global_step == 6 and result.final_dir == tmp_path / "final"
    assert len(seen) == 6  # 2 updates per bin, one micro-batch each
    for i, t in enumerate(seen):
        k = i // 2 + 1
        assert float(t.min()) >= (k - 1) / 3 and float(t.max()) <= k / 3
    assert sorted(p.name for p in (tmp_path / "final").iterdir() if p.is_dir()) == [
        "noise_bin_1",
        "noise_bin_2",
        "noise_bin_3",
    ]
    model = load_adapter(LLaDAModelLM(config), tmp_path / "final")
    assert noise_bin_count(model) == 3
    ids = torch.tensor([tok.encode("1 + 1")])
    assert generate(model, ids, gen_length=4, steps=4).shape == (1, ids.shape[1] + 4)
    with pytest.raises(ValueError, match="--bins"):
        finetune.FinetuneConfig(dataset="x.json", adapter="multi-lora")
    with pytest.raises(ValueError, match="only to adapter=multi-lora"):
        finetune.FinetuneConfig(dataset="x.json", adapter="lora", bins=3)
