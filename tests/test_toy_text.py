"""The toy text world: generated problems with the right answers, held-out sets that stay held out, the committed toy
LLaDA doing its arithmetic (and not yet the downstream format), and the fine-tuning example's embedded default run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForMaskedLM, AutoTokenizer

from nara_diffusion.text import LLaDAModelLM
from nara_diffusion.text.data import encode_prompts
from nara_diffusion.text.loading import load_for_inference
from nara_diffusion.toy import text as toy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "llada"
TOY = EXAMPLES / "toy"
DATA = EXAMPLES / "data"
#: Held-out accuracy the committed toy base must keep on 50 problems of each pretraining task (it scored 90%, 66% and
#: 100% on all 400/300/300 held-out problems when it was made; see examples/llada/toy/scores.json).
MIN_ACCURACY = {"add": 0.8, "sub": 0.5, "word": 0.9}


def _expected(task: str, prompt: str) -> int:
    """The answer, worked out from the prompt text alone."""
    a, b = (int(x) for x in re.findall(r"\d+", prompt))
    assert 10 <= a <= 99 and 10 <= b <= 99, prompt
    if task == "word":
        verb = re.search(r" and (\w+) \d+\.", prompt).group(1)
        return a + b if verb in ("gets", "finds", "buys") else a - b
    if task == "dif":
        return abs(a - b)
    return a - b if task in ("sub", "amp", "dlr") else a + b  # "&" and "$" are new notations for "-"


@pytest.mark.parametrize("task", toy.TASKS)
def test_problems_carry_their_answers(task):
    records = toy.train_records([task], 300, seed=5) + toy.test_records(task)
    for record in records:
        assert record["answer"] == record["output"] == str(_expected(task, record["instruction"]))
    if task in ("sub", "amp", "dlr", "dif"):
        assert min(int(r["answer"]) for r in records) >= 0
    if task == "dif":  # both orders of the operands occur, so the order must be read
        orders = {int(a) < int(b) for a, b in (re.findall(r"\d+", r["instruction"]) for r in records)}
        assert orders == {True, False}


@pytest.mark.parametrize("task", toy.TASKS)
def test_held_out_problems_never_reach_training(task):
    train, held = toy.split_operands(task)
    assert len(held) == toy.HOLDOUT_SIZE[task] and not set(train) & set(held)
    trained = {(r["instruction"]) for r in toy.train_records([task], 3 * len(train), seed=0)}
    assert not trained & {r["instruction"] for r in toy.test_records(task)}
    assert toy.test_records(task, 20) == toy.test_records(task)[:20]  # a fixed set, always in the same order
    if task in toy.BENCHMARK_TASKS:
        validation = {r["instruction"] for r in toy.validation_records(task)}
        test = {r["instruction"] for r in toy.test_records(task)}
        assert len(test) == toy.BENCHMARK_TEST_SIZE and len(validation) == toy.VALIDATION_SIZE
        assert not validation & test and not validation & trained
    else:
        with pytest.raises(ValueError, match="validation split"):
            toy.validation_records(task)


def test_committed_downstream_files_are_the_generated_ones():
    train = json.loads((DATA / "toy_amp_train.json").read_text())
    test = json.loads((DATA / "toy_amp_test.json").read_text())
    assert [r["instruction"] for r in train] == [r["instruction"] for r in toy.train_records(["amp"], 1000, seed=0)]
    assert [r["instruction"] for r in test] == [r["instruction"] for r in toy.test_records("amp", 100)]
    assert len({r["instruction"] for r in train}) == 1000
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}


def test_char_tokenizer_is_one_token_per_character_with_a_chat_template():
    tok = toy.char_tokenizer()
    text = "Mia has 23 pens and gets 45. How many now?"
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(text)
    ids = encode_prompts(tok, [text])[0]
    rendered = tok.decode(ids)
    assert rendered.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + text)
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.mask_token == "<|mdm_mask|>" and tok.eos_token == "<|endoftext|>"


def test_toy_base_is_a_small_hub_folder():
    assert {"config.json", "model.safetensors", "tokenizer.json", "scores.json", "README.md"} <= {
        p.name for p in TOY.iterdir()
    }
    assert sum(p.stat().st_size for p in TOY.iterdir()) < 20 * 2**20
    model = AutoModelForMaskedLM.from_pretrained(TOY)
    assert isinstance(model, LLaDAModelLM)
    assert AutoTokenizer.from_pretrained(TOY).chat_template == toy.CHAT_TEMPLATE


@pytest.fixture(scope="module")
def toy_base():
    return load_for_inference(None, str(TOY))


def test_toy_base_does_arithmetic_on_held_out_problems(toy_base):
    model, tokenizer = toy_base
    scores = toy.score_tasks(model, tokenizer, toy.PRETRAIN_TASKS, 50)
    for task, result in scores.items():
        assert result.total == 50
        assert result.accuracy >= MIN_ACCURACY[task], (task, result.accuracy, result.records[:5])


def test_toy_base_cannot_read_the_downstream_format_yet(toy_base):
    model, tokenizer = toy_base
    result = toy.score_tasks(model, tokenizer, [toy.DOWNSTREAM_TASK], 100)[toy.DOWNSTREAM_TASK]
    assert result.accuracy <= 0.1, result.accuracy


def test_toy_base_cannot_do_the_benchmark_tasks_yet(toy_base):
    model, tokenizer = toy_base
    for task, result in toy.score_tasks(model, tokenizer, toy.BENCHMARK_TASKS, 50).items():
        assert result.accuracy <= 0.1, (task, result.accuracy, result.records[:5])


@pytest.mark.slow
def test_finetune_example_runs_the_toy_default_with_no_arguments(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune.py"), "--max_steps", "3", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the toy paths do not depend on the working directory
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 3 updates" in done.stdout
    assert re.search(r"test accuracy: before \d+\.\d% -> after \d+\.\d%", done.stdout), done.stdout
    before = [json.loads(line) for line in (out / "test_before.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in before] == [r["instruction"] for r in toy.test_records("amp", 100)]
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "NARA" and Path(adapter["base_model_name_or_path"]) == TOY
