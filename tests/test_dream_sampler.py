"""Dream's reverse process through the one sampler core: token for token against a plain re-implementation of Dream's
Hub ``_sample``, a hand-checkable model, λ at every step, batch invariance, the shift where the Denoiser and the
likelihood read logits, and the command lines and the lm-eval model on a tiny Dream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from builders import EOS, MASK, V, perturb_, save_hub_dream, tiny_chat_tokenizer, tiny_dream
from reference import computed
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

import nara_diffusion as nd
from nara_diffusion.text.likelihood import mc_loglikelihood, stratified_mask_counts
from nara_diffusion.text.sampler import Denoiser, dream_generate, generate
from nara_diffusion.text.unmasking import filter_logits, gumbel_keys, step_plan

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "llada" / "data" / "toy_addition.json"
ALGS = ["origin", "maskgit_plus", "topk_margin", "entropy"]


# -- an independent re-implementation of Dream's Hub sampler --------------------------------------------------------
def _hub_tokens(logits: torch.Tensor, alg: str, top_p: Optional[float], top_k: Optional[int]):
    """Dream's ``sample_tokens`` at temperature 0, written plainly: nucleus then top-k cut, softmax, the most probable
    token, and the alg's confidence."""
    if top_p is not None and top_p < 1:
        ranked, order = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(ranked, dim=-1), dim=-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), torch.finfo(logits.dtype).min)
    if top_k is not None:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k)[0][..., -1:], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        ranked = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = ranked[:, 0] - ranked[:, 1]
    if alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def hub_sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int,
    steps: int,
    alg: str,
    eps: float = 1e-3,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Dream's ``diffusion_generate`` → ``_sample`` (Dream-org/Dream-v0-Instruct-7B, generation_utils.py) at
    temperature 0 and ``alg_temp`` None, from reading it: the whole canvas every step with its 4-D padding mask and
    positions, the logits shifted by ``cat([l[:, :1], l[:, :-1]])``, ``origin`` revealing each masked position with
    probability 1 − s/t (one ``rand`` per masked position), the others the top-n confidences with n = int(batch-mean
    #masked · (1 − s/t)). The mask token's logit is set to −∞ by a logits hook (Dream's
    ``generation_logits_hook_func``), as the library never proposes it."""
    x = F.pad(input_ids, (0, max_new_tokens), value=MASK)
    if attention_mask is not None and bool((attention_mask == 0).any()):
        full = F.pad(attention_mask, (0, max_new_tokens), value=1)
        tok_idx = (full.long().cumsum(-1) - 1).masked_fill(full == 0, 1)
        attention = full[:, None, None, :].bool() & full[:, None, :, None].bool()
    else:
        tok_idx, attention = None, "full"
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == MASK
        logits = model(x, attention, tok_idx).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., MASK] = float("-inf")  # the logits hook
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full_like(x[mask_index], MASK)
            reveal = torch.rand(x0.shape, generator=generator) < p_transfer
            x0[reveal] = _hub_tokens(mask_logits[reveal], alg, top_p, top_k)[1]
            x[mask_index] = x0
            continue
        confidence, x0 = _hub_tokens(mask_logits, alg, top_p, top_k)
        num_mask = mask_index.sum() / mask_index.shape[0]
        n = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        scores = torch.full_like(x, float("-inf"), dtype=logits.dtype)
        scores[mask_index] = confidence
        if n > 0:
            index = torch.topk(scores, n).indices
            proposal = torch.full_like(x, MASK)
            proposal[mask_index] = x0
            rows = torch.arange(x.shape[0]).unsqueeze(1).expand_as(index)
            x[rows, index] = proposal[rows, index]
    return x


@pytest.fixture(scope="module")
def dream() -> nn.Module:
    return tiny_dream(seed=3, scale=0.3)


@pytest.mark.parametrize("alg", ALGS)
def test_matches_dreams_hub_sampler_token_for_token(dream, alg):
    prompt = torch.tensor([[3, 5, 7, 2, 9]])
    settings = {"max_new_tokens": 12, "steps": 7, "alg": alg}
    expected = hub_sample(dream, prompt, **settings, generator=torch.Generator().manual_seed(4))
    out = dream_generate(
        dream,
        prompt,
        **settings,
        temperature=0.0,
        top_p=None,
        alg_temp=None,
        generator=torch.Generator().manual_seed(4),
    )
    assert out.tolist() == expected.tolist()
    assert (out[0, 5:] != MASK).all()


def test_family_defaults_and_dreams_cuts_match_the_hub_sampler(dream):
    prompt = torch.tensor([[4, 8, 2]])
    expected = hub_sample(dream, prompt, max_new_tokens=10, steps=10, alg="entropy", top_p=0.9, top_k=6)
    # on a Dream model generate() picks Dream's timesteps schedule and the entropy algorithm by itself
    out = generate(dream, prompt, gen_length=10, steps=10, top_p=0.9, top_k=6)
    assert out.tolist() == expected.tolist()
    plain = generate(dream, prompt, gen_length=10, steps=10)
    assert plain.tolist() == hub_sample(dream, prompt, max_new_tokens=10, steps=10, alg="entropy").tolist()


def test_a_padded_batch_matches_the_hub_sampler_and_each_row_alone(dream):
    """The Hub's count is the batch mean of #masked; every row starts with max_new_tokens masks and reveals the same
    number per step, so it is each row's count: the padded batch gives each row's own tokens."""
    prompts = [[3, 5, 7, 2, 9], [6, 4], [8, 1, 2, 3]]
    ids = torch.full((3, 5), EOS)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 5 - len(p) :], mask[row, 5 - len(p) :] = torch.tensor(p), 1
    settings = {"max_new_tokens": 9, "steps": 5, "alg": "maskgit_plus"}
    batched = dream_generate(dream, ids, attention_mask=mask, temperature=0.0, top_p=None, **settings)
    assert batched.tolist() == hub_sample(dream, ids, mask, **settings).tolist()
    for row, p in enumerate(prompts):
        alone = dream_generate(dream, torch.tensor([p]), temperature=0.0, top_p=None, **settings)
        assert batched[row, 5:].tolist() == alone[0, len(p) :].tolist()


# -- a hand-checkable case ----------------------------------------------------------------------------------------
class FixedRows(nn.Module):
    """A shifted-family model (``model_type`` "Dream", no ``logits_positions``) whose unshifted output row i puts
    logit ``strength[i]`` on token ``10 + i`` and 0 elsewhere, whatever the input; it records each input canvas."""

    logits_shift = 1

    def __init__(self, strength: list[float]) -> None:
        super().__init__()
        self.config = nd.text.DreamConfig(
            vocab_size=V, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
            intermediate_size=8, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS,
        )  # fmt: skip
        self.strength = strength
        self.weight = nn.Parameter(torch.zeros(1))
        self.canvases: list[list[int]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> MaskedLMOutput:
        self.canvases.append(input_ids[0].tolist())
        logits = torch.zeros(*input_ids.shape, V)
        for i, c in enumerate(self.strength[: input_ids.shape[1]]):
            logits[:, i, 10 + i] = c
        return MaskedLMOutput(logits=logits)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_hand_built_model_reveals_the_shifted_rows_in_order_of_confidence(alg):
    """Prompt of 2, 4 tokens in 4 steps. Times linspace(1, 1e-3, 5) = 1, .75025, .5005, .25075, .001 give counts
    int(4·.24975) = 0, int(4·.33289) = 1, int(3·.49900) = 1 and the last 2: plan [0, 1, 1, 2] (LLaDA's would be
    [1, 1, 1, 1]). Position j reads row j − 1: positions 2, 3, 4, 5 read strengths 1, 4, 2, 3 and propose tokens 11,
    12, 13, 14; every algorithm ranks a higher strength first, so 3 is revealed, then 5, then 4 and 2."""
    assert [s.count for s in step_plan("timesteps", 4, 4)] == [0, 1, 1, 2]
    model = FixedRows([0.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    out = generate(model, torch.tensor([[5, 6]]), gen_length=4, steps=4, remasking=alg)
    assert out[0].tolist() == [5, 6, 11, 12, 13, 14]
    m = MASK
    assert model.canvases == [[5, 6, m, m, m, m], [5, 6, m, 12, m, m], [5, 6, m, 12, m, 14]]  # the 0-step skipped


def test_hand_built_model_origin_reveals_with_probability_one_minus_s_over_t():
    """``origin`` draws one U[0, 1) per masked position and reveals those below 1 − s/t (all at the last step)."""
    model = FixedRows([0.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    out = generate(model, torch.tensor([[5, 6]]), gen_length=4, steps=2, remasking="origin",
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    draws = torch.rand(4, generator=torch.Generator().manual_seed(0))
    p = 1 - torch.tensor(0.5005) / 1  # linspace(1, 1e-3, 3)[1] = 0.5005
    first = [t if u < p else MASK for t, u in zip([11, 12, 13, 14], draws.tolist(), strict=True)]
    assert model.canvases[1] == [5, 6, *first]
    assert out[0].tolist() == [5, 6, 11, 12, 13, 14]


# -- NaRA's λ and the options ------------------------------------------------------------------------------------------
def test_nara_gets_the_masked_fraction_of_the_generation_at_every_step():
    model = nd.get_nara_model(
        tiny_dream(seed=3, scale=0.3), nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"])
    ).eval()
    perturb_(model, scale=0.3)
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(computed(kw["noise_level"]).clone()), with_kwargs=True
    )
    try:
        ids = torch.tensor([[EOS, 3, 5], [4, 6, 8]])
        mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
        dream_generate(model, ids, attention_mask=mask, max_new_tokens=8, steps=4, temperature=0.0, top_p=None)
    finally:
        hook.remove()
    left, expected = 8, []
    for step in step_plan("timesteps", 8, 4):
        if step.count:
            expected.append(left / 8)
        left -= step.count
    assert [s.tolist() for s in seen] == [[e, e] for e in expected]


def test_alg_temp_draws_the_scheduled_count_from_the_tempered_confidence():
    """Step counts follow the plan whatever alg_temp; a cold alg_temp takes the most confident; one draw picks
    position j with probability softmax(confidence / alg_temp)_j (Dream's multinomial)."""
    model = FixedRows([0.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    generate(model, torch.tensor([[5, 6]]), gen_length=4, steps=4, remasking="entropy", alg_temp=1e-6)
    m = MASK
    assert model.canvases == [[5, 6, m, m, m, m], [5, 6, m, 12, m, m], [5, 6, m, 12, m, 14]]
    model.canvases.clear()
    generate(model, torch.tensor([[5, 6]]), gen_length=4, steps=4, remasking="maskgit_plus", alg_temp=2.0,
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert [sum(t != m for t in c[2:]) for c in model.canvases] == [0, 1, 2]
    confidence = torch.tensor([0.1, 0.9, 0.4, 0.6])
    keys = gumbel_keys(confidence.expand(20000, 4), 0.5, torch.Generator().manual_seed(0))
    freq = torch.bincount(keys.argmax(1), minlength=4).double() / 20000
    expected = torch.softmax(confidence.double() / 0.5, 0)
    assert (freq - expected).abs().max() < 4 * (0.25 / 20000) ** 0.5  # four standard errors at most


def test_threshold_applies_to_probability_confidences(dream):
    prompt = torch.tensor([[3, 5, 7]])
    fast = generate(dream, prompt, gen_length=8, steps=8, remasking="maskgit_plus", threshold=0.05)
    assert (fast != MASK).all()
    with pytest.raises(ValueError, match="threshold"):
        generate(dream, prompt, gen_length=8, steps=8, threshold=0.9)  # entropy: a negative confidence
    with pytest.raises(ValueError, match="top_p"):
        generate(dream, prompt, gen_length=8, steps=8, remasking="low_confidence", top_p=0.9)
    with pytest.raises(ValueError, match="alg_temp"):
        generate(dream, prompt, gen_length=8, steps=8, remasking="origin", alg_temp=0.5)
    # with the K/V cache too (tests/test_dream_cache.py checks its tokens)
    cached = generate(dream, prompt, gen_length=8, steps=8, remasking="maskgit_plus", threshold=0.05, cache="dual")
    assert (cached != MASK).all()


def test_filter_logits_keeps_the_nucleus_and_the_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    low = torch.finfo(torch.float32).min
    kept = filter_logits(logits, top_p=0.75) > low  # 0.5 alone is below 0.75; with 0.3 it is 0.8: stop
    assert kept.tolist() == [[True, False, True, False]]
    assert (filter_logits(logits, top_k=3) > low).tolist() == [[True, False, True, True]]


# -- the shift where logits are read ------------------------------------------------------------------------------
@pytest.mark.parametrize("first", [False, True], ids=["positions", "with-position-0"])
def test_denoiser_reads_each_position_from_the_row_before(dream, first):
    ids = torch.randint(0, V - 1, (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.zeros(2, 9, dtype=torch.bool)
    positions[0, [2, 5, 8]] = positions[1, [1, 4]] = True
    positions[1, 0] = first
    with Denoiser(dream) as denoise:
        got = denoise(ids, positions)
    full = dream(ids).logits  # unshifted: row i predicts token i + 1
    rows = [(0, 1), (0, 4), (0, 7)] + ([(1, 0)] if first else []) + [(1, 0), (1, 3)]
    expected = torch.stack([full[b, i] for b, i in rows])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_likelihood_scores_the_target_with_the_shifted_rows():
    """A model whose row i puts all its mass on token (input_i + 1) mod (V − 1): with the shift, a target that
    continues each token by +1 is certain (log-likelihood 0); read in place it would be impossible."""

    class Successor(nn.Module):
        logits_shift = 1

        def __init__(self) -> None:
            super().__init__()
            self.config = FixedRows([]).config
            self.weight = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kwargs):
            clean = input_ids.clone()
            for j in range(1, clean.shape[1]):  # a masked token is known here as its predecessor + 1
                clean[:, j] = torch.where(clean[:, j] == MASK, (clean[:, j - 1] + 1) % (V - 1), clean[:, j])
            return MaskedLMOutput(logits=F.one_hot((clean + 1) % (V - 1), V).float() * 30.0)

    model = Successor()
    ll = mc_loglikelihood(model, [3, 4], [5, 6, 7], mc_num=6, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert ll == pytest.approx(0.0, abs=1e-9)
    wrong = mc_loglikelihood(
        model, [3, 4], [6, 7, 8], mc_num=6, batch_size=3, generator=torch.Generator().manual_seed(0)
    )
    assert wrong < -20


def test_likelihood_on_a_tiny_dream_equals_the_explicit_shifted_computation(dream):
    prefix, target = [3, 5, 7], [2, 9, 4, 6]
    seq = torch.tensor(prefix + target)
    ll = mc_loglikelihood(dream, prefix, target, mc_num=4, batch_size=4, generator=torch.Generator().manual_seed(2))
    # the same masks, drawn as mc_loglikelihood draws them (stratified counts, then random ranks)
    g = torch.Generator().manual_seed(2)
    counts = stratified_mask_counts(4, 4, g)
    ranks = torch.rand((4, 4), generator=g).argsort(1).argsort(1)
    masked = torch.cat([torch.zeros(4, 3, dtype=torch.bool), ranks < counts[:, None]], 1)
    noisy = seq.expand(4, -1).masked_fill(masked, MASK)
    with torch.no_grad():
        logits = dream(noisy).logits
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream's own shift
    ce = F.cross_entropy(shifted[masked], seq.expand(4, -1)[masked], reduction="none").double()
    expected = -float((ce / (counts.double()[masked.nonzero()[:, 0]] / 4)).sum() / 4)
    assert ll == pytest.approx(expected, abs=1e-4)


# -- the command lines and lm-eval ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dream_folder(tmp_path_factory) -> Path:
    """A tiny Dream saved as on the Hub, with a chat tokenizer, and a NaRA adapter on it."""
    tokenizer = tiny_chat_tokenizer()
    root = tmp_path_factory.mktemp("dream-sampler")
    save_hub_dream(tiny_dream(scale=0.1, tokenizer=tokenizer), root / "base", tokenizer)
    nara = nd.get_nara_model(
        nd.text.DreamModel.from_pretrained(root / "base"), nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    perturb_(nara)
    nara.save_pretrained(root / "nara")
    return root


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    path = ROOT / "examples" / "llada" / script
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_generate_and_evaluate_scripts_run_a_dream_with_its_options(dream_folder, tmp_path):
    base, nara = str(dream_folder / "base"), str(dream_folder / "nara")
    done = _run("generate.py", "--model", base, "--adapter_path", nara, "--prompt", "what is two plus three",
                "--gen_length", "6", "--alg", "maskgit_plus", "--top_k", "5", "--eps", "0.01")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert ">>> what is two plus three" in done.stdout
    records = [{"instruction": "what is two plus three", "output": "5", "answer": "5"}] * 2
    (tmp_path / "test.json").write_text(json.dumps(records))
    done = _run("evaluate.py", "--model", base, "--adapter_path", nara, "--test_dataset", str(tmp_path / "test.json"),
                "--gen_length", "4", "--steps", "2", "--output_dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nara: accuracy" in done.stdout
    assert len((tmp_path / "predictions.nara.jsonl").read_text().splitlines()) == 2


def test_finetune_scores_a_test_set_on_a_dream(dream_folder, tmp_path, monkeypatch):
    import nara_diffusion.text.finetune as finetune
    from nara_diffusion.text.finetune import FinetuneConfig, run_finetune

    calls: list[dict] = []
    evaluate = finetune.evaluate_generation
    monkeypatch.setattr(finetune, "evaluate_generation", lambda *a, **kw: calls.append(kw) or evaluate(*a, **kw))
    config = FinetuneConfig(
        model=str(dream_folder / "base"), dataset=str(DATA), output_dir=str(tmp_path), max_length=48, batch_size=4,
        grad_accum=1, val_size=0, r=2, hidden_dims=[8], max_steps=1, eval_every=0, report_to="none",
        test_dataset=str(DATA), test_size=2, test_gen_length=16,
    )  # fmt: skip
    run_finetune(config)
    for when in ("before", "after"):
        lines = [json.loads(x) for x in (tmp_path / f"test_{when}.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all(isinstance(r["prediction"], str) for r in lines)
    # Dream's sampler runs one block (LLaDA's configured lengths are cut into blocks of 8)
    assert [(c["gen_length"], c["block_length"]) for c in calls] == [(16, 16), (16, 16)]


def test_lm_eval_model_generates_and_scores_with_a_dream(dream_folder):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from nara_diffusion.text.lm_eval_model import NaRALLaDA

    args = f"pretrained={dream_folder / 'base'},adapter={dream_folder / 'nara'},dtype=float32,gen_length=4,mc_num=2"
    lm = NaRALLaDA.create_from_arg_string(args + ",alg=topk_margin,top_k=5,mc_batch_size=2")
    assert lm.gen_kwargs["remasking"] == "topk_margin" and lm.gen_kwargs["top_k"] == 5
    assert lm.gen_kwargs.get("block_length") is None  # Dream samples in one block
    gen = Instance("generate_until", {}, ("what is two plus three", {"until": ["\n"]}), 0)
    assert isinstance(lm.generate_until([gen])[0], str)
    choice = Instance("loglikelihood", {}, ("what is two plus", " three"), 0)
    ((ll, greedy),) = lm.loglikelihood([choice])
    assert ll < 0 and greedy is False


def test_an_answer_ends_at_either_family_s_end_of_turn_token():
    """Dream-Instruct closes a turn with ChatML's ``<|im_end|>``, LLaDA-Instruct with ``<|eot_id|>``: both cut the
    decoded answer, as EOS does; a vocabulary without them adds nothing."""
    from nara_diffusion.text.prompting import decode_generation, stop_token_ids

    plain = tiny_chat_tokenizer()
    assert stop_token_ids(plain) == [plain.eos_token_id]
    tok = tiny_chat_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|eot_id|>"]})
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])
    assert sorted(stop_token_ids(tok)) == sorted([tok.eos_token_id, im_end, eot])
    words = tok.convert_tokens_to_ids(["the", "answer", "is", "two"])
    assert decode_generation(tok, [*words[:2], im_end, *words[2:]], stop_token_ids(tok)) == "the answer"
