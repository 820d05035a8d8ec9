"""Evaluation: answer extraction and scoring, Monte-Carlo likelihood, noise profile, adapter loading, and the
generate.py / evaluate.py examples on a tiny LLaDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import peft
import pytest
import torch
import torch.nn.functional as F
from builders import MASK, make_tiny_base, noise_bins, perturb_, profile_data, tiny_llada, tiny_llada_config
from reference import computed, f32_tol
from torch import nn

import nara_diffusion as nd
from nara_diffusion.text.likelihood import mc_loglikelihood, stratified_mask_counts
from nara_diffusion.text.loading import load_adapter, load_for_inference
from nara_diffusion.text.noise_bins import noise_bin_count
from nara_diffusion.text.noise_profile import noise_profile, plot_noise_profiles
from nara_diffusion.text.scoring import (
    accuracy,
    answer_kind,
    evaluate_generation,
    extract_commonsense,
    extract_number,
    extract_option,
    score_answer,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "llada"
DATA = EXAMPLES / "data" / "toy_addition.json"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- answer extraction ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("49 + 97 = 146. The answer is 146.", 146.0),
        ("She pays $1,234.50 in total.", 1234.5),
        ("He ends with -3 apples", -3.0),
        ("Step 1: 2 + 2 = 4\n#### 72\nThat is all 5", 72.0),
        ("no digits here", None),
        ("values 3,4 and 5", 5.0),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_extract_option_and_commonsense():
    assert extract_option("Because the rate doubles, the answer is (C).") == "C"
    assert extract_option("Answer: b") == "B"
    assert extract_option("We compare A and D; D is larger.") == "D"
    assert extract_option("Because of that, nothing") is None  # the B of "Because" is not an answer
    assert extract_commonsense("The correct answer is answer3 because answer1 is wrong", "answer2") == "answer3"
    assert extract_commonsense("TRUE, it is.", "false") == "true"
    assert extract_commonsense("solution2", "solution1") == "solution2"
    assert extract_commonsense("the sentence uses option1", "option2") == "option1"
    assert extract_commonsense("ending4 fits", "ending1") == "ending4"
    assert extract_commonsense("nothing useful", "answer1") is None


def test_score_answer_per_kind_and_auto_detection():
    assert [answer_kind(g) for g in ("72", "#### 1,000", "C", "answer4", "true", "Paris")] == [
        "math",
        "math",
        "option",
        "commonsense",
        "commonsense",
        "exact",
    ]
    assert score_answer("so the answer is 72.0", "72") == (72.0, True)
    assert score_answer("The answer is 146.", "49 + 97 = 146. The answer is 146.", kind="math") == (146.0, True)
    assert score_answer("answer is 73", "72")[1] is False
    assert score_answer("The answer is (B)", "B") == ("B", True)
    assert score_answer("answer2", "answer1") == ("answer2", False)
    assert score_answer("  Paris  is\nnice ", "Paris is nice") == ("Paris is nice", True)
    assert accuracy(["4", "the answer is 5", "answer1"], ["4", "6", "answer1"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="kind"):
        score_answer("x", "y", kind="fuzzy")
    with pytest.raises(ValueError, match="no number"):
        score_answer("4", "four", kind="math")


# -- evaluation of generated answers ---------------------------------------------------------------------------------
class AnswerModel(nn.Module):
    """Always writes ``answer_ids`` at the start of the generation (the last ``gen_length`` positions), then EOS."""

    def __init__(self, answer_ids: list[int], gen_length: int, vocab: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(mask_token_id=None, eos_token_id=None, max_sequence_length=512)
        self.answer, self.gen, self.vocab = answer_ids, gen_length, vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> SimpleNamespace:
        batch, length = input_ids.shape
        targets = [self.config.eos_token_id] * length
        targets[length - self.gen : length - self.gen + len(self.answer)] = self.answer
        logits = torch.zeros(batch, length, self.vocab)
        logits[:, torch.arange(length), torch.tensor(targets)] = 5.0
        return SimpleNamespace(logits=logits)


def test_evaluate_generation_scores_each_record(tmp_path):
    tok = make_tiny_base().char_tokenizer()
    model = AnswerModel(tok.encode("The answer is 4."), gen_length=24, vocab=len(tok))
    model.config.mask_token_id, model.config.eos_token_id = tok.mask_token_id, tok.eos_token_id
    records = [
        {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 4. The answer is 4.", "answer": "4"},
        {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"},
    ]
    result = evaluate_generation(model, tok, records, gen_length=24, steps=24, block_length=8, batch_size=2)
    assert (result.accuracy, result.correct, result.total) == (0.5, 1, 2)
    assert [r["prediction"] for r in result.records] == ["The answer is 4."] * 2  # cut at EOS
    assert [r["extracted"] for r in result.records] == [4.0, 4.0]
    result.write_jsonl(tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False] and rows[0]["prompt"] == "What is 2 + 2?"


# -- Monte-Carlo likelihood -----------------------------------------------------------------------------------------
def test_stratified_counts_follow_llada():
    gen = torch.Generator().manual_seed(5)
    counts = stratified_mask_counts(4, 8, gen)
    k = int(torch.randint(1, 9, (), generator=torch.Generator().manual_seed(5)))
    expected = (torch.round(torch.linspace(float(k), k + 3 * 2.0, 4)).long() - 1) % 8 + 1
    assert torch.equal(counts, expected)
    assert sorted(((counts - counts[0]) % 8).tolist()) == [0, 2, 4, 6]  # evenly spaced mod T


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_mc_loglikelihood_of_one_token_is_its_log_probability(cfg_scale):
    model = tiny_llada(seed=5)
    prefix, target = [5, 6, 7], [8]
    ll = mc_loglikelihood(model, prefix, target, mc_num=4, batch_size=2, cfg_scale=cfg_scale)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, MASK]])).logits[0, 3]
        if cfg_scale:
            uncond = model(torch.tensor([[MASK] * 4])).logits[0, 3]
            logits = uncond + (cfg_scale + 1) * (logits - uncond)
    # a batch of 2 (or 4 under CFG) with gathered logits vs one plain forward: ≈ 544 roundings (2 blocks × 240, ln_f,
    # head), logits ≤ 10 apart from [MASK]'s −100, and CFG's (c + 1)·cond − c·uncond adds up 2c + 1 such errors
    tol = f32_tol(544, magnitude=10.0 * (1 + 2 * cfg_scale))
    assert ll == pytest.approx(float(F.log_softmax(logits, -1)[8]), abs=tol)


def test_mc_loglikelihood_gives_nara_the_sample_mask_ratio():
    model = nd.get_nara_model(tiny_llada(), nd.NaRAConfig(r=4, target_modules=["q_proj"])).eval()
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0].clone(), computed(kw["noise_level"]))), with_kwargs=True
    )
    ll = mc_loglikelihood(
        model, [5, 6], [7, 8, 9, 10], mc_num=8, batch_size=4, generator=torch.Generator().manual_seed(0)
    )
    assert ll < 0 and len(seen) == 2
    for ids, lam in seen:
        assert not (ids[:, :2] == MASK).any()  # the prefix is never masked
        torch.testing.assert_close(lam, (ids[:, 2:] == MASK).sum(1).float() / 4)


# -- noise profile --------------------------------------------------------------------------------------------------
def test_noise_profile_uses_the_same_masks_for_every_model_and_gives_nara_t():
    data, ts = profile_data(), [0.25, 0.5, 1.0]
    base = tiny_llada(seed=6)
    base_inputs = []
    handle = base.register_forward_pre_hook(lambda m, a, kw: base_inputs.append(a[0].clone()), with_kwargs=True)
    base_losses = noise_profile(base, data, ts, batch_size=2)
    handle.remove()
    # at t = 1 every answer token is masked: the loss is Σ CE / answer_len, averaged over examples
    with torch.no_grad():
        expected = 0.0
        for item in data:
            ids, p = item["input_ids"], item["prompt_length"]
            noisy = ids.clone()
            noisy[p:] = MASK
            logits = base(noisy[None]).logits[0, p:]
            expected += float(F.cross_entropy(logits, ids[p:], reduction="sum")) / (len(ids) - p)
    # batches of 2 with gathered logits and a chunked cross-entropy vs one example at a time: ≈ 544 roundings,
    # logits ≤ 10 (a wrong normalisation would move the loss ≈ 4.8 by 10 % or more)
    assert float(base_losses[2]) == pytest.approx(expected / 3, abs=f32_tol(544, magnitude=10.0))
    nara = nd.get_nara_model(base, nd.NaRAConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    perturb_(nara)
    seen = []
    nara.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0].clone(), computed(kw["noise_level"]))), with_kwargs=True
    )
    nara_losses = noise_profile(nara, data, ts, batch_size=2)
    assert [ids.tolist() for ids, _ in seen] == [ids.tolist() for ids in base_inputs]
    assert [lam.tolist() for _, lam in seen] == [[t] * len(ids) for t in ts for ids in base_inputs[:2]]
    assert base_losses.shape == (3,) and not torch.equal(base_losses, nara_losses)
    assert torch.equal(noise_profile(nara, data, ts, batch_size=2), nara_losses)  # deterministic


def test_noise_profile_of_a_noise_bin_set_uses_the_bin_of_t(tmp_path):
    model = noise_bins(tiny_llada(), [1, 2])
    active = []
    model.get_base_model().register_forward_pre_hook(lambda m, a: active.append(model.active_adapter))
    noise_profile(model, profile_data(), [0.25, 0.5, 0.75, 1.0], batch_size=3)
    assert active == ["noise_bin_1", "noise_bin_1", "noise_bin_2", "noise_bin_2"]
    path = plot_noise_profiles([0.25, 0.5], {"base": [2.0, 1.0], "lora": [1.9, 0.8]}, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


# -- loading adapters -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> SimpleNamespace:
    """A tiny LLaDA with the char tokenizer, a NaRA adapter, a LoRA adapter and a noise-bin set, on disk."""
    root = tmp_path_factory.mktemp("saved")
    tok = make_tiny_base().char_tokenizer()
    config = tiny_llada_config(tok, max_sequence_length=256)
    torch.manual_seed(0)
    nd.text.LLaDAModelLM(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")

    def base() -> nn.Module:
        return nd.text.LLaDAModelLM.from_pretrained(root / "base")

    nara = nd.get_nara_model(base(), nd.NaRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_(nara)
    nara.save_pretrained(root / "nara")
    tok.save_pretrained(root / "nara")
    lora_config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(base(), lora_config).save_pretrained(root / "lora")
    for k in (1, 2, 3):
        peft.get_peft_model(base(), lora_config).save_pretrained(root / "bins" / f"noise_bin_{k}")
    return SimpleNamespace(root=root, tokenizer=tok, base=base)


def test_load_adapter_recognises_each_kind(saved):
    nara = load_adapter(saved.base(), saved.root / "nara")
    assert isinstance(nara.base_model, nd.core.NaRAModel)
    lora = load_adapter(saved.base(), saved.root / "lora")
    assert isinstance(lora.base_model, peft.LoraModel)
    bins = load_adapter(saved.base(), saved.root / "bins")
    assert noise_bin_count(bins) == 3 and set(bins.peft_config) == {"noise_bin_1", "noise_bin_2", "noise_bin_3"}
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        load_adapter(saved.base(), saved.root)


def test_load_adapter_refuses_a_noise_bin_set_with_a_missing_bin(saved, tmp_path):
    for k in (1, 3):
        (tmp_path / f"noise_bin_{k}").symlink_to(saved.root / "bins" / f"noise_bin_{k}")
    with pytest.raises(ValueError, match=r"missing bins \[2\]"):
        load_adapter(saved.base(), tmp_path)


def test_load_for_inference_finds_the_base_model_from_the_adapter(saved):
    model, tok = load_for_inference(saved.root / "nara")
    assert isinstance(model.base_model, nd.core.NaRAModel) and not model.training
    assert tok.mask_token_id == model.config.mask_token_id
    base, _ = load_for_inference(None, str(saved.root / "base"))
    assert isinstance(base, nd.text.LLaDAModelLM)


# -- the examples -----------------------------------------------------------------------------------------------------
def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_generate_example_runs_on_cpu(saved):
    done = _run(
        [
            *(str(EXAMPLES / "generate.py"), "--adapter_path", str(saved.root / "nara"), "--prompt", "What is 1 + 1?"),
            *("--prompt", "Hi", "--gen_length", "8", "--block_length", "4", "--temperature", "0.5"),
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ">>> What is 1 + 1?" in done.stdout and ">>> Hi" in done.stdout


@pytest.mark.slow
def test_evaluate_example_prints_accuracy_and_writes_predictions(saved, tmp_path):
    done = _run(
        [
            *(str(EXAMPLES / "evaluate.py"), "--adapter_path", str(saved.root / "nara"), "--include_base"),
            *("--test_dataset", str(DATA), "--test_size", "3", "--test_kind", "math"),
            *("--gen_length", "8", "--block_length", "4", "--output_dir", str(tmp_path)),
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nara: accuracy" in done.stdout and "base: accuracy" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "predictions.nara.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"prompt", "gold", "prediction", "extracted", "correct"} <= set(rows[0])


@pytest.mark.slow
def test_evaluate_example_draws_the_noise_profile(saved, tmp_path):
    done = _run(
        [
            *(str(EXAMPLES / "evaluate.py"), "--profile", "--adapter_path", str(saved.root / "nara")),
            *("--adapter_path", str(saved.root / "lora"), "--test_dataset", str(DATA), "--test_size", "6"),
            *("--max_length", "80", "--ts", "0.2,0.6,1.0", "--output_dir", str(tmp_path)),
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "noise_profile.png").read_bytes()[:4] == b"\x89PNG"
    numbers = json.loads((tmp_path / "noise_profile.json").read_text())
    assert numbers["ts"] == [0.2, 0.6, 1.0] and set(numbers["losses"]) == {"base", "nara", "lora"}
