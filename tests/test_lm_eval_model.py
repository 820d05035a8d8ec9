"""The lm-eval model ``nara_llada`` through lm-eval's own ``simple_evaluate``, on a tiny local task and a tiny LLaDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import make_tiny_base, perturb_, tiny_llada_config

import nara_diffusion as nd

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (pip install 'nara-diffusion[eval]'; CI installs it with [test])"
)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"question": "What is 1 + 1?", "answer": "2", "choices": ["2", "3"], "label": 0},
    {"question": "What is 2 + 2?", "answer": "4", "choices": ["5", "4"], "label": 1},
    {"question": "What is 3 + 1?", "answer": "4", "choices": ["4", "7"], "label": 0},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny LLaDA with the character tokenizer of make_tiny_base.py, a NaRA adapter on it, and the task data."""
    root = tmp_path_factory.mktemp("lm-eval")
    tok = make_tiny_base().char_tokenizer()
    config = tiny_llada_config(tok, max_sequence_length=128)
    torch.manual_seed(0)
    nd.text.LLaDAModelLM(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    nara = nd.get_nara_model(nd.text.LLaDAModelLM.from_pretrained(root / "base"), nd.NaRAConfig(r=4))
    perturb_(nara)
    nara.save_pretrained(root / "nara")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def _tasks(data: Path) -> list[dict]:
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "Q: {{question}}\nA:",
    }
    generation = {
        **common,
        "task": "tiny_gen",
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"]},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    choice = {
        **common,
        "task": "tiny_mc",
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    return [generation, choice]


@pytest.mark.slow
def test_simple_evaluate_runs_generation_and_likelihood_tasks(tiny, monkeypatch):
    from lm_eval.tasks import TaskManager

    import nara_diffusion.text.lm_eval_model as lm_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    calls = {"generate": 0, "mc_loglikelihood": 0}

    def counted(name):
        original = getattr(lm_model, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(lm_model, name, counted(name))
    args = {
        "pretrained": str(tiny / "base"),
        "adapter": str(tiny / "nara"),
        "dtype": "float32",
        "gen_length": 8,
        "steps": 8,
        "block_length": 4,
        "mc_num": 4,
        "mc_batch_size": 2,
        "batch_size": 2,
    }
    out = lm_eval.simple_evaluate(
        model="nara_llada",
        model_args=args,
        tasks=_tasks(tiny / "data.jsonl"),
        task_manager=TaskManager(),
        log_samples=True,
    )
    results = out["results"]
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
    assert calls == {"generate": 2, "mc_loglikelihood": 6}  # 3 prompts in batches of 2; 3 questions × 2 choices
    responses = [s["resps"][0][0] for s in out["samples"]["tiny_gen"]]
    assert len(responses) == 3 and all(isinstance(r, str) and "\n" not in r for r in responses)


def test_the_model_loads_the_adapter_and_refuses_unknown_arguments(tiny):
    from nara_diffusion.text.lm_eval_model import NaRALLaDA

    lm = NaRALLaDA.create_from_arg_string(f"pretrained={tiny / 'base'},adapter={tiny / 'nara'},dtype=float32")
    assert isinstance(lm.model.base_model, nd.core.NaRAModel) and lm.gen_kwargs["block_length"] == 8
    with pytest.raises(ValueError, match="Unknown nara_llada model_args"):
        NaRALLaDA(pretrained=str(tiny / "base"), temprature=0.5)
    with pytest.raises(NotImplementedError, match="masked diffusion"):
        lm.loglikelihood_rolling([])
    assert lm.gen_kwargs["cache"] is None
    fast = NaRALLaDA.create_from_arg_string(f"pretrained={tiny / 'base'},dtype=float32,cache=dual,threshold=0.9")
    assert (fast.gen_kwargs["cache"], fast.gen_kwargs["threshold"]) == ("dual", 0.9)
    with pytest.raises(ValueError, match="cache must be"):
        NaRALLaDA(pretrained=str(tiny / "base"), dtype="float32", cache="full")


@pytest.mark.slow
def test_importing_nara_diffusion_does_not_import_lm_eval():
    code = "import sys, nara_diffusion; assert 'lm_eval' not in sys.modules and 'matplotlib' not in sys.modules"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
