"""Fast-dLLM-class decoding (issue 17): the native LLaDA's K/V cache, the sampler's ``cache=`` modes against a plain
re-implementation of Fast-dLLM's prefix/dual-cache loop, batch invariance for every mode, λ under caching, and the
memoised NaRA cores (the hypernetwork off the per-step path)."""

from __future__ import annotations

import contextlib
from typing import Optional

import peft
import pytest
import torch
from builders import EOS, LLADA_EXAMPLE, MASK, V, noise_bins, perturb_, tiny_llada, tiny_llada_config
from reference import computed, f32_tol
from torch import nn

import nara_diffusion as nd
import nara_diffusion.text.denoiser as denoiser
import nara_diffusion.text.sampler as sampler
from nara_diffusion.core.hypernet import CoreGenerator
from nara_diffusion.text.data import encode_prompts
from nara_diffusion.text.kv_cache import LLaDACache
from nara_diffusion.text.llada import LLaDAModelLM
from nara_diffusion.text.loading import load_for_inference
from nara_diffusion.text.sampler import generate

MODES = [None, "prefix", "dual"]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


def gqa_llada(seed: int = 0) -> LLaDAModelLM:
    """A tiny LLaDA with 4 query heads on 2 key/value heads (the cache stores K/V before GQA's repetition)."""
    torch.manual_seed(seed)
    model = LLaDAModelLM(tiny_llada_config(n_kv_heads=2, init_std=0.5)).eval()
    return model


# -- the model's cache ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_cached_forward_with_fresh_kv_equals_the_full_forward(padded):
    model = gqa_llada()
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]])
    ids = torch.cat([ids, torch.full((2, 12), MASK)], 1)
    mask = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1) if padded else None
    ids = ids if padded else ids.clamp(min=2)  # unpadded: every column a real token
    start, end = 8, 12  # the second block of 4 after the prompt
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
        cache = full.cache
        assert isinstance(cache, LLaDACache) and (len(cache), cache.length, cache.batch_size) == (2, 20, 2)
        assert cache.keys[0].shape == (2, 2, 20, 8)  # [B, n_kv_heads, L, head_dim]
        dual = model(ids[:, start:end], attention_mask=mask, cache=cache, query_start=start).logits
        prefix = model(ids[:, start:], attention_mask=mask, cache=cache.crop(start)).logits
    # the same K/V, only the reductions' shapes differ (fewer queries; keys assembled by concatenation): float32
    # rounding over 2 blocks of width 32 and ≤ 20 keys, logits ≲ 10 (init_std 0.5); a wrong position or a stale key
    # moves them by ≈ 1
    tol = f32_tol(2 * (32 + 20 + 64), magnitude=10.0)
    torch.testing.assert_close(dual, full.logits[:, start:end], rtol=0, atol=tol)
    torch.testing.assert_close(prefix, full.logits[:, start:], rtol=0, atol=tol)


def test_stale_kv_change_the_result_and_a_bad_cache_is_refused():
    model = gqa_llada()
    ids = torch.randint(2, 18, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        changed = ids.clone()
        changed[0, 10] = (ids[0, 10] + 1) % 18
        fresh = model(changed).logits[:, 4:8]
        stale = model(changed[:, 4:8], cache=cache, query_start=4).logits  # column 10's K/V are the old ones
        assert (fresh - stale).abs().max() > 1e-3  # bidirectional: the cache is an approximation
        with pytest.raises(ValueError, match="does not fit"):
            model(ids[:, 2:6], cache=cache.crop(4), query_start=2)
        with pytest.raises(ValueError, match="needs a cache"):
            model(ids, query_start=3)
    model.train()
    assert model(ids, use_cache=True).cache is None  # a trainer's use_cache=True changes nothing
    with pytest.raises(ValueError, match="inference"):
        model(ids[:, 4:8], cache=cache, query_start=4)


def test_a_padded_row_is_computed_exactly_as_if_alone():
    model = gqa_llada(seed=1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17]]
    ids, mask = left_padded(prompts)
    ids = torch.cat([ids, torch.full((3, 8), MASK)], 1)
    mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        window = model(ids[:, 6:10], attention_mask=mask, cache=out.cache, query_start=6).logits
        for row, p in enumerate(prompts):
            alone = torch.tensor([p + [MASK] * 8])
            own = model(alone, use_cache=True)
            # bit for bit: the row's own RoPE positions and its real keys only (not just up to rounding)
            assert torch.equal(out.logits[row, 6:], own.logits[0, len(p) :])
            got = model(alone[:, len(p) : len(p) + 4], cache=own.cache, query_start=len(p)).logits
            assert torch.equal(window[row], got[0])


# -- the sampler's cache modes ----------------------------------------------------------------------------------------
def fast_dllm_reference(
    model: nn.Module, prompt: torch.Tensor, mode: str, *, gen_length: int, steps: int, block_length: int
) -> torch.Tensor:
    """Fast-dLLM's ``generate_with_prefix_cache`` / ``generate_with_dual_cache`` (NVlabs/Fast-dLLM, llada/generate.py)
    for one prompt, greedy with low-confidence remasking and LLaDA's linear schedule, written plainly from its
    description: the block's first step is a full forward that fills the cache; later steps run the block and the
    suffix against the prefix's K/V (prefix), or the block alone against the prefix's and the suffix's (dual)."""
    width = prompt.shape[1]
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    per_block = steps // (gen_length // block_length)
    counts = [block_length // per_block + (i < block_length % per_block) for i in range(per_block)]
    for b in range(gen_length // block_length):
        start, end = width + b * block_length, width + (b + 1) * block_length
        cache = None
        for i in range(per_block):
            if cache is None:
                out = model(x, use_cache=True)
                logits, cache = out.logits[:, start:end], out.cache
                cache = cache.crop(start) if mode == "prefix" else cache
            else:
                stop = x.shape[1] if mode == "prefix" else end
                logits = model(x[:, start:stop], cache=cache, query_start=start).logits[:, : end - start]
            logits[..., MASK] = -torch.inf
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.float(), -1).gather(-1, x0[..., None])[..., 0]
            p = torch.where(x[:, start:end] == MASK, p, -torch.inf)
            chosen = p[0].sort(descending=True, stable=True).indices[: counts[i]]
            x[0, start + chosen] = x0[0, chosen]
    return x


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize(("gen_length", "steps", "block_length"), [(12, 12, 4), (12, 6, 6)])
def test_cache_modes_follow_fast_dllm(mode, gen_length, steps, block_length):
    model = tiny_llada(seed=3)
    settings = {"gen_length": gen_length, "steps": steps, "block_length": block_length}
    for prompt in ([5, 6, 7], [8, 9, 10, 11, 12]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = fast_dllm_reference(model, ids, mode, **settings)
        ours = generate(model, ids, cache=mode, **settings)
        assert torch.equal(ours, expected)  # the same forwards in the same order: the same bits
        if mode == "dual":
            assert not torch.equal(ours, generate(model, ids, **settings))  # the approximation changes something


def test_each_block_fills_the_cache_once_and_later_steps_run_their_window():
    model = tiny_llada()
    calls: list[tuple[int, Optional[int], bool]] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a[0].shape[1], kw.get("query_start"), bool(kw.get("use_cache")))),
        with_kwargs=True,
    )
    for mode, window in (("prefix", lambda b: 8 - 4 * b), ("dual", lambda b: 4)):
        calls.clear()
        generate(model, torch.tensor([[5, 6, 7]]), gen_length=8, steps=8, block_length=4, cache=mode)
        expected = []
        for b in range(2):
            expected += [(11, 0, True)] + [(window(b), 3 + 4 * b, False)] * 3
        assert calls == expected


class NoCache(nn.Module):
    """A masked-diffusion LM without a K/V cache: constant logits."""

    def __init__(self) -> None:
        super().__init__()
        self.config = tiny_llada_config()
        self.head = nn.Parameter(torch.randn(V))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> nn.Module:
        out = nn.Module()
        out.logits = self.head.expand(*input_ids.shape, V)
        return out


def test_cache_is_refused_for_a_model_without_one():
    with pytest.raises(ValueError, match="cache must be"):
        generate(tiny_llada(), torch.tensor([[5, 6]]), gen_length=4, steps=4, cache="full")
    with pytest.raises(ValueError, match="K/V cache"):
        generate(NoCache(), torch.tensor([[5, 6]]), gen_length=4, steps=4, cache="dual")
    assert generate(NoCache(), torch.tensor([[5, 6]]), gen_length=4, steps=4).shape == (1, 6)


# -- batch invariance -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    model, tokenizer = load_for_inference(None, str(LLADA_EXAMPLE / "toy"))
    prompts = encode_prompts(tokenizer, ["What is 63&45?", "Mia has 23 pens and gets 45. How many now?", "12+9?"])
    nara = nd.get_nara_model(
        load_for_inference(None, str(LLADA_EXAMPLE / "toy"))[0],
        nd.NaRAConfig(r=4, target_modules=["q_proj", "v_proj", "attn_out"]),
    ).eval()
    perturb_(nara, scale=0.3)
    return model, nara, prompts, tokenizer.pad_token_id


@pytest.mark.parametrize("adapter", ["base", "nara"])
def test_a_batch_gives_each_prompt_its_tokens_alone_in_every_mode(toy, adapter):
    base, nara, prompts, pad = toy
    model = base if adapter == "base" else nara
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for cache in MODES:
        for threshold in (None, 0.7):
            settings = {"gen_length": 8, "steps": 8, "block_length": 4, "cache": cache, "threshold": threshold}
            batched = generate(model, ids, attention_mask=mask, till_eos=False, **settings)[:, width:]
            alone = [generate(model, torch.tensor([p]), till_eos=False, **settings)[0, len(p) :] for p in prompts]
            assert torch.equal(batched, torch.stack(alone)), (cache, threshold)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cfg_till_eos_and_noise_bins_are_batch_invariant_with_a_cache(mode):
    prompts = [[5, 6], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17]]
    ids, mask = left_padded(prompts)

    def check(model: nn.Module, **settings) -> torch.Tensor:
        batched = generate(model, ids, attention_mask=mask, cache=mode, **settings)[:, ids.shape[1] :]
        alone = [generate(model, torch.tensor([p]), cache=mode, **settings)[0, len(p) :] for p in prompts]
        assert torch.equal(batched, torch.stack(alone)), settings
        return batched

    check(tiny_llada(seed=5), gen_length=8, steps=8, block_length=4, cfg_scale=1.0)
    ended = check(tiny_llada(seed=6), gen_length=12, steps=12, block_length=4, till_eos=True)
    assert ended[2, 8:].tolist() == [EOS] * 4  # this row stopped early (EOS in an earlier block): the path ran
    check(noise_bins(tiny_llada(seed=4), [1, 2, 3, 4]), gen_length=8, steps=8, block_length=4, noise_rule="sequence")


# -- λ under caching and the memoised cores ---------------------------------------------------------------------------
def _nara(seed: int = 0) -> nn.Module:
    model = nd.get_nara_model(tiny_llada(seed), nd.NaRAConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    perturb_(model, scale=0.3)
    return model


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_noise_level_under_caching_follows_the_canvas_rule(mode):
    model = _nara()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(computed(kw["noise_level"]).clone()), with_kwargs=True)
    ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11, 12]])
    out = generate(model, ids, attention_mask=mask, gen_length=8, steps=8, block_length=4, cache=mode, till_eos=False)
    assert len(seen) == 8 and MASK not in out.tolist()
    for j, lam in enumerate(seen):  # one token per step: (8 - j) masks left in the generation before step j
        torch.testing.assert_close(lam, torch.tensor([(8 - j) / 8] * 2), rtol=0, atol=0)


def test_the_hypernetwork_runs_once_per_distinct_noise_level_and_changes_no_token(monkeypatch):
    model = _nara(seed=2)
    runs: list[int] = []
    lams: list[list[float]] = []
    generator = next(m for m in model.modules() if isinstance(m, CoreGenerator))
    generator.register_forward_hook(lambda m, a, out: runs.append(a[0].shape[0]))
    model.register_forward_pre_hook(
        lambda m, a, kw: lams.append(computed(kw["noise_level"]).tolist()), with_kwargs=True
    )
    ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]])
    settings = {"gen_length": 12, "steps": 12, "block_length": 4, "noise_rule": "sequence", "till_eos": False}
    results = {}
    for cache in MODES:
        runs.clear(), lams.clear()
        memoised = results[cache] = generate(model, ids, attention_mask=mask, cache=cache, **settings)
        distinct = {v for step in lams for v in step}
        assert len(distinct) > 12 and len(runs) == len(distinct) and set(runs) == {1}  # each λ alone, once
        for p in ([5, 6, 7], [13, 14]):  # batch of one: the un-memoised hypernetwork sees the same [1] input
            with monkeypatch.context() as patch:
                patch.setattr(denoiser, "memoized_cores", lambda model: contextlib.nullcontext())
                runs.clear()
                plain = generate(model, torch.tensor([p]), cache=cache, **settings)
                assert len(runs) == 12  # once per forward without the memo
            assert torch.equal(generate(model, torch.tensor([p]), cache=cache, **settings), plain)
        assert memoised.shape == (3, 17)
    runs.clear()
    with sampler.memoize_cores(model):  # an evaluation loop: the λ grid repeats from call to call
        first = generate(model, ids, attention_mask=mask, **settings)
        assert len(runs) > 12
        runs.clear()
        assert torch.equal(generate(model, ids, attention_mask=mask, **settings), first) and runs == []
    assert torch.equal(first, results[None])
    with torch.no_grad():  # outside the sampler the core is computed as before, and gradients still flow in training
        lam = torch.tensor([0.5, 0.25])
        adapter = nd.get_adapter(model)
        with adapter.memoized_cores():
            assert torch.equal(adapter.core(lam), adapter.core(lam))
    adapter.train()
    with adapter.memoized_cores():
        assert adapter.core(torch.tensor([0.5])).requires_grad


@pytest.mark.parametrize("rule, n", [("generation", 12), ("block", 4)])
def test_grid_rules_compute_every_core_in_one_run_close_to_each_value_alone(rule, n):
    """Under the generation and block rules λ can only be k / n: the sampler computes the n + 1 cores in one
    hypernetwork run when the call starts, and none later (nor in the next call of an evaluation loop); each agrees
    with the core of its value computed alone up to the rounding of the hypernetwork's reductions."""
    model = _nara(seed=3)
    adapter = nd.get_adapter(model)
    runs: list[int] = []
    generator = next(m for m in model.modules() if isinstance(m, CoreGenerator))
    generator.register_forward_hook(lambda m, a, out: runs.append(a[0].shape[0]))
    ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]])
    settings = {"gen_length": 12, "steps": 12, "block_length": 4, "noise_rule": rule, "till_eos": False}
    for cache in MODES:
        runs.clear()
        batched = generate(model, ids, attention_mask=mask, cache=cache, **settings)
        assert runs == [n + 1]  # the whole grid, once
        for row, p in enumerate([[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]):
            alone = generate(model, torch.tensor([p]), cache=cache, **settings)
            assert torch.equal(alone[0, -12:], batched[row, -12:])
    runs.clear()
    with sampler.memoize_cores(model):
        first = generate(model, ids, attention_mask=mask, **settings)
        again = generate(model, ids, attention_mask=mask, **settings)
    assert runs == [n + 1] and torch.equal(first, again)
    grid = torch.arange(n + 1) / n
    with torch.no_grad(), adapter.memoized_cores():
        assert nd.core.tuner.precompute_cores(model, grid) == n + 1 and nd.core.tuner.precompute_cores(model, grid) == 0
        together = torch.stack([adapter.core(grid[k : k + 1])[0] for k in range(n + 1)])
    with torch.no_grad():
        alone = torch.stack([adapter.core(grid[k : k + 1])[0] for k in range(n + 1)])
        assert not torch.equal(alone[1], alone[2])  # the core really depends on λ
    # C = I + η·F(e(λ)): F's three layers reduce over at most 512 terms; its outputs (and activations) are O(1) here.
    linears = [m for m in adapter.generator.layers if isinstance(m, nn.Linear)]
    deviation = float((alone - torch.eye(4)).abs().max()) / adapter.core_scale
    tol = adapter.core_scale * f32_tol(max(m.in_features for m in linears), max(1.0, deviation), depth=len(linears))
    torch.testing.assert_close(together, alone, rtol=0, atol=tol)
    assert nd.core.tuner.precompute_cores(model, grid) == 0  # outside the memo: nothing is kept


def test_lora_model_with_cache_matches_one_by_one():
    model = peft.get_peft_model(tiny_llada(seed=6), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb_(model, scale=0.3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    ids, mask = left_padded(prompts)
    batched = generate(model, ids, attention_mask=mask, gen_length=8, steps=8, block_length=4, cache="dual")
    for row, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), gen_length=8, steps=8, block_length=4, cache="dual")
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, len(p) :])


def test_the_examples_pass_cache_and_threshold_to_the_sampler():
    import argparse

    from builders import example_module

    generate_py = example_module(LLADA_EXAMPLE / "generate.py", "generate_example")
    parser = argparse.ArgumentParser()
    generate_py.add_sampler_arguments(parser)
    model = tiny_llada()
    fast = generate_py.sampler_kwargs(parser.parse_args(["--cache", "dual", "--threshold", "0.9"]), model)
    plain = generate_py.sampler_kwargs(parser.parse_args([]), model)
    assert (fast["cache"], fast["threshold"], plain["cache"], plain["threshold"]) == ("dual", 0.9, None, None)
    out = generate(model, torch.tensor([[5, 6, 7]]), **{**fast, "gen_length": 8, "steps": 8, "block_length": 4})
    assert out.shape == (1, 11) and MASK not in out.tolist()
