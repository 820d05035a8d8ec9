"""Fast-dLLM's block-wise K/V cache on the native Dream (issues 17 and 18): the model's cache against its full forward,
the sampler's ``cache=`` modes against a plain re-implementation of Fast-dLLM's Dream loop with the logits shift,
batch invariance in every mode (base and NaRA), NaRA's λ under caching, and the refusals."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from builders import EOS, MASK, perturb_, tiny_dream
from reference import computed, f32_tol
from torch import nn
from transformers import DynamicCache

import nara_diffusion as nd
from nara_diffusion.text.denoiser import Denoiser
from nara_diffusion.text.kv_cache import KVCache, LLaDACache
from nara_diffusion.text.sampler import generate

MODES = [None, "prefix", "dual"]


def left_padded(prompts: list[list[int]], pad: int = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


@pytest.fixture(scope="module")
def dream() -> nn.Module:
    return tiny_dream(seed=3, scale=0.3)  # 4 query heads on 2 key/value heads: the cache holds K/V before GQA


# -- the model's cache ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_cached_forward_with_fresh_kv_equals_the_full_forward(dream, padded):
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]])
    ids = torch.cat([ids, torch.full((2, 12), MASK)], 1)
    mask = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1) if padded else None
    ids = ids if padded else ids.clamp(min=2)  # unpadded: every column a real token
    start, end = 7, 12  # the column before the second block of 4, and the block (the sampler's Dream window)
    with torch.no_grad():
        full = dream(ids, attention_mask=mask, use_cache=True)
        cache = full.cache
        assert isinstance(cache, LLaDACache) and KVCache is LLaDACache
        assert (len(cache), cache.length, cache.batch_size) == (2, 20, 2)
        assert cache.keys[0].shape == (2, 2, 20, 8)  # [B, n_kv_heads, L, head_dim]
        dual = dream(ids[:, start:end], attention_mask=mask, cache=cache, query_start=start).logits
        prefix = dream(ids[:, start:], attention_mask=mask, cache=cache.crop(start)).logits
        positions = torch.zeros(2, 20 - start, dtype=torch.bool)
        positions[:, 1:5] = True
        chosen = dream(ids[:, start:], attention_mask=mask, cache=cache.crop(start), logits_positions=positions)
    # the same K/V, only the reductions' shapes differ (fewer queries; keys assembled by concatenation): float32
    # rounding over 2 layers of width 32, ≤ 20 keys and an MLP of 48, logits ≲ 10; a wrong position or a stale key
    # moves them by ≈ 1
    tol = f32_tol(2 * (32 + 20 + 48), magnitude=10.0)
    assert full.logits.abs().max() < 10
    torch.testing.assert_close(dual, full.logits[:, start:end], rtol=0, atol=tol)
    torch.testing.assert_close(prefix, full.logits[:, start:], rtol=0, atol=tol)
    torch.testing.assert_close(chosen.logits, full.logits[:, start + 1 : start + 5].reshape(-1, 20), rtol=0, atol=tol)


def test_a_padded_row_is_computed_as_if_alone_under_caching(dream):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17]]
    ids, mask = left_padded(prompts)
    ids = torch.cat([ids, torch.full((3, 8), MASK)], 1)
    mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
    tol = f32_tol(2 * (32 + 14 + 48), magnitude=10.0)
    with torch.no_grad():
        out = dream(ids, attention_mask=mask, use_cache=True)
        window = dream(ids[:, 5:10], attention_mask=mask, cache=out.cache, query_start=5).logits
        for row, p in enumerate(prompts):
            alone = torch.tensor([p + [MASK] * 8])
            own = dream(alone, use_cache=True)
            torch.testing.assert_close(out.logits[row, 6:], own.logits[0, len(p) :], rtol=0, atol=tol)
            # the row's own RoPE positions (counted from its first real token) and its real keys only
            got = dream(alone[:, len(p) - 1 : len(p) + 4], cache=own.cache, query_start=len(p) - 1).logits
            torch.testing.assert_close(window[row], got[0], rtol=0, atol=tol)


def test_stale_kv_change_the_result_and_bad_calls_are_refused(dream):
    ids = torch.randint(2, 18, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = dream(ids, use_cache=True).cache
        changed = ids.clone()
        changed[0, 10] = (ids[0, 10] + 1) % 18
        fresh = dream(changed).logits[:, 4:8]
        stale = dream(changed[:, 4:8], cache=cache, query_start=4).logits  # column 10's K/V are the old ones
        assert (fresh - stale).abs().max() > 1e-3  # bidirectional: the cache is an approximation
        assert torch.equal(dream(changed[:, 4:8], past_key_values=cache, query_start=4).logits, stale)
        # with one layer the K/V of a position depend on its own token only: after the input's tokens change, the
        # cached K/V of the other positions are still exact, and the input must use its own fresh ones
        one = tiny_dream(seed=4, scale=0.3, num_hidden_layers=1)
        kept = one(ids, use_cache=True).cache
        edited = ids.clone()
        edited[0, 4:8] = (ids[0, 4:8] + 1) % 18
        full = one(edited).logits
        tol = f32_tol(32 + 12 + 48, magnitude=10.0)
        dual = one(edited[:, 4:8], cache=kept, query_start=4).logits
        torch.testing.assert_close(dual, full[:, 4:8], rtol=0, atol=tol)
        torch.testing.assert_close(one(edited[:, 4:], cache=kept.crop(4)).logits, full[:, 4:], rtol=0, atol=tol)
        with pytest.raises(ValueError, match="does not fit"):
            dream(ids[:, 2:6], cache=cache.crop(4), query_start=2)
        with pytest.raises(ValueError, match="needs a cache"):
            dream(ids, query_start=3)
        with pytest.raises(ValueError, match=r"\[B, L\]"):
            dream(ids[:, 4:8], attention_mask=torch.ones(1, 1, 12, 12, dtype=torch.bool), cache=cache, query_start=4)
        with pytest.raises(ValueError, match="past_key_values"):
            dream(ids, past_key_values=DynamicCache())
    dream.train()
    try:
        assert dream(ids, use_cache=True).cache is None  # a trainer's use_cache=True changes nothing
        with pytest.raises(ValueError, match="inference"):
            dream(ids[:, 4:8], cache=cache, query_start=4)
        assert dream(ids, use_cache=False).logits.requires_grad  # training itself is untouched
    finally:
        dream.eval()


def test_the_denoiser_refuses_a_window_without_the_row_before_the_block(dream):
    ids = torch.randint(2, 18, (1, 12), generator=torch.Generator().manual_seed(0))
    with Denoiser(dream) as denoise:
        _, cache = denoise.cached(ids, torch.ones(1, 12, dtype=torch.bool), use_cache=True)
        block = torch.ones(1, 4, dtype=torch.bool)
        with pytest.raises(ValueError, match="query_start=5"):  # position 6 is read from row 5
            denoise.cached(ids[:, 6:10], block, cache=cache, query_start=6)
        logits, _ = denoise.cached(ids[:, 5:10], F.pad(block, (1, 0)), cache=cache, query_start=5)
    torch.testing.assert_close(logits, dream(ids).logits[0, 5:9], rtol=0, atol=f32_tol(2 * (32 + 12 + 48), 10.0))


# -- the sampler's cache modes ----------------------------------------------------------------------------------------
def fast_dllm_dream(
    model: nn.Module,
    prompt: torch.Tensor,
    mode: str,
    *,
    gen_length: int,
    steps: int,
    block_length: int,
    alg: str = "maskgit_plus",
    threshold: Optional[float] = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Fast-dLLM's Dream sampler with prefix / dual cache (NVlabs/Fast-dLLM, dream/model/generation_utils_block.py)
    for one prompt at temperature 0, written plainly from reading it, with the window of the later steps starting one
    column before the block (the row there predicts the block's first position) and every step committing by Dream's
    plan: the block's first step is a full forward that fills the cache, its logits shifted by
    ``cat([l[:, :1], l[:, :-1]])``; later steps run the column before the block with the block and the suffix against
    the K/V before it (prefix), or with the block alone against the prefix's and the suffix's (dual). Each step
    reveals int(#masked · (1 − s/t)) (the rest at the last step) of Dream's times linspace(1, eps, S + 1) per block,
    the most confident first, or with ``threshold`` every masked position whose top probability is ≥ τ and the most
    confident one. The mask token is never proposed."""
    width = prompt.shape[1]
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    per_block = steps // (gen_length // block_length)
    times = torch.linspace(1, eps, per_block + 1)
    for b in range(gen_length // block_length):
        start, end = width + b * block_length, width + (b + 1) * block_length
        cache, i = None, 0
        while bool((x[:, start:end] == MASK).any()):
            if cache is None:
                out = model(x, use_cache=True)
                logits = torch.cat([out.logits[:, :1], out.logits[:, :-1]], 1)[:, start:end]
                cache = out.cache.crop(start - 1) if mode == "prefix" else out.cache
            else:
                stop = x.shape[1] if mode == "prefix" else end
                logits = model(x[:, start - 1 : stop], cache=cache, query_start=start - 1).logits[:, : end - start]
            logits = logits.float()
            logits[..., MASK] = -torch.inf
            probs = torch.softmax(logits, -1)
            confidence, x0 = probs.max(-1)
            if alg == "entropy":
                confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
            masked = x[0, start:end] == MASK
            confidence = confidence[0].masked_fill(~masked, -torch.inf)
            if threshold is not None:
                chosen = (confidence >= threshold) & masked
                chosen[confidence.argmax()] = True
                index = chosen.nonzero()[:, 0]
            else:
                left = masked.sum()
                n = int(left * (1 - times[i + 1] / times[i])) if i < per_block - 1 else int(left)
                assert n > 0  # the settings below give every step something to commit
                index = confidence.sort(descending=True, stable=True).indices[:n]
                i += 1
            x[0, start + index] = x0[0, index]
    return x


SETTINGS = [
    {"gen_length": 8, "steps": 6, "block_length": 4},  # per block: [1, 1, 2]
    {"gen_length": 12, "steps": 6, "block_length": 6},  # per block: [1, 2, 3]
    {"gen_length": 8, "steps": 8, "block_length": 4, "threshold": 0.5},
]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["blocks-of-4", "blocks-of-6", "threshold"])
def test_cache_modes_follow_fast_dllms_dream_loop(dream, mode, settings):
    algs = ["maskgit_plus"] if "threshold" in settings else ["maskgit_plus", "entropy"]
    changed = False
    for alg in algs:
        for prompt in ([5, 6, 7], [8, 9, 10, 11, 12]):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                expected = fast_dllm_dream(dream, ids, mode, alg=alg, **settings)
            ours = generate(dream, ids, cache=mode, remasking=alg, **settings)
            assert torch.equal(ours, expected), (alg, prompt)  # the same forwards in the same order: the same bits
            changed |= not torch.equal(ours, generate(dream, ids, remasking=alg, **settings))
    assert changed  # the approximation changes something, so the cached K/V were really used


def test_each_block_fills_the_cache_once_and_later_steps_run_from_the_column_before(dream):
    calls: list[tuple[int, Optional[int], bool]] = []
    hook = dream.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a[0].shape[1], kw.get("query_start"), bool(kw.get("use_cache")))),
        with_kwargs=True,
    )
    try:
        for mode, window in (("prefix", lambda b: 9 - 4 * b), ("dual", lambda b: 5)):
            calls.clear()
            generate(dream, torch.tensor([[5, 6, 7]]), gen_length=8, steps=6, block_length=4, cache=mode)
            expected = []
            for b in range(2):  # the block starts at 3 + 4b; its later steps start one column earlier
                expected += [(11, 0, True)] + [(window(b), 2 + 4 * b, False)] * 2
            assert calls == expected
    finally:
        hook.remove()


# -- batch invariance and λ --------------------------------------------------------------------------------------------
def _nara(seed: int = 0) -> nn.Module:
    model = nd.get_nara_model(tiny_dream(seed, scale=0.3), nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb_(model.eval(), scale=0.3)
    return model


@pytest.mark.parametrize("adapter", ["base", "nara"])
def test_a_batch_gives_each_prompt_its_tokens_alone_in_every_mode(dream, adapter):
    model = dream if adapter == "base" else _nara(seed=1)
    prompts = [[5, 6], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17]]
    ids, mask = left_padded(prompts)
    for cache in MODES:
        for threshold in (None, 0.5):
            settings = {"gen_length": 8, "steps": 6, "block_length": 4, "cache": cache, "threshold": threshold}
            settings |= {"remasking": "maskgit_plus", "till_eos": False}
            batched = generate(model, ids, attention_mask=mask, **settings)[:, ids.shape[1] :]
            alone = [generate(model, torch.tensor([p]), **settings)[0, len(p) :] for p in prompts]
            assert torch.equal(batched, torch.stack(alone)), (cache, threshold)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_noise_level_under_caching_follows_the_canvas_rule(mode):
    model = _nara()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(computed(kw["noise_level"]).clone()), with_kwargs=True)
    ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11, 12]])
    out = generate(model, ids, attention_mask=mask, gen_length=8, steps=6, block_length=4, cache=mode, till_eos=False)
    assert MASK not in out.tolist()
    # per block the plan commits 1, 1, 2: masks left in the generation before each of the six steps
    expected = [8, 7, 6, 4, 3, 2]
    assert len(seen) == 6
    for lam, left in zip(seen, expected, strict=True):  # the windows too get the λ of the whole canvas, per row
        torch.testing.assert_close(lam, torch.tensor([left / 8] * 2), rtol=0, atol=0)
