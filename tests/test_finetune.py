"""`examples/llada/finetune.py` as a user runs it: end to end on a tiny LLaDA, under DDP, and with bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from builders import example_module, failure_of, free_port, make_tiny_base

import nara_diffusion as nd

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "llada"
DATA = EXAMPLES / "data" / "toy_addition.json"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL = ["--max_length", "80", "--batch_size", "4", "--grad_accum", "2", "--val_size", "8", "--r", "4"]


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env or ENV, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """``python examples/llada/make_tiny_base.py <folder>``, run in this process."""
    out = tmp_path_factory.mktemp("tiny-llada")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["make_tiny_base.py", str(out)])
        make_tiny_base().main()
    return out


@pytest.fixture(scope="module")
def finetune_script() -> ModuleType:
    """examples/llada/finetune.py as a module, for command lines checked in this process."""
    return example_module(EXAMPLES / "finetune.py", "llada_example_finetune")


def _finetune(tiny_base: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python examples/llada/finetune.py`` on the tiny base and the toy data, writing to ``output_dir``."""
    args = ["--model", str(tiny_base), "--dataset", str(DATA), "--output_dir", str(output_dir), *extra]
    return _run([sys.executable, str(EXAMPLES / "finetune.py"), *args])


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_finetune_end_to_end_writes_a_loadable_adapter(tiny_base, tmp_path):
    done = _finetune(tiny_base, tmp_path, "--max_steps", "6", "--eval_every", "3", *SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 6 updates" in done.stdout
    assert sum("val/loss" in row for row in _log(tmp_path)) == 2
    base = nd.text.LLaDAModelLM.from_pretrained(tiny_base)
    model = nd.load_nara_model(base, tmp_path / "final")
    ids = torch.randint(0, 50, (2, 12))
    assert model(ids, noise_level=torch.tensor([0.2, 0.8])).logits.shape == (2, 12, base.config.embedding_size)
    assert (tmp_path / "final" / "tokenizer.json").is_file()  # the tokenizer travels with the adapter


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_ends_with_identical_adapters(tiny_base, tmp_path):
    # accelerate runs CPU data parallelism (gloo) through its torchrun launcher with ACCELERATE_USE_CPU set
    done = _run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(EXAMPLES / "finetune.py"),
            "--model",
            str(tiny_base),
            "--dataset",
            str(DATA),
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "3",
            "--eval_every",
            "0",
            "--report_to",
            "none",
            *SMALL,
        ],
        env={**ENV, "ACCELERATE_USE_CPU": "true"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fingerprints = next(row["replica_fingerprints"] for row in _log(tmp_path) if "replica_fingerprints" in row)
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    nd.load_nara_model(nd.text.LLaDAModelLM.from_pretrained(tiny_base), tmp_path / "final")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dataset", "missing.json"], "missing.json"),
        (["--lerning_rate", "1"], "valid fields"),
        (["--adapter", "dora"], "adapter must be one of"),
    ],
)
def test_bad_input_is_named(tiny_base, finetune_script, tmp_path, extra, message):
    args = ["--model", str(tiny_base), "--dataset", str(DATA), "--output_dir", str(tmp_path), *extra]
    assert message in failure_of(finetune_script.main, args)


def test_a_model_without_mask_token_is_rejected(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder = tmp_path / "bert"
    BertForMaskedLM(
        BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(folder)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    with pytest.raises(ValueError, match="not a masked-diffusion LM"):
        nd.text.load_base_model(str(folder))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--objective", "lift"],
        ["--objective", "lift", "--approximate", "true", "--lift_variant", "lift2"],
        ["--objective", "gift"],
        ["--adapter", "lora", "--objective", "lift"],
    ],
)
def test_lift_and_gift_objectives_run_end_to_end(tiny_base, tmp_path, extra):
    """The script's command-line flags through its parser into a whole run, in this process (a subprocess per
    objective would cost ~4 s of start-up each; `test_finetune_end_to_end_writes_a_loadable_adapter` runs the
    script itself)."""
    from nara_diffusion.text.finetune import FinetuneConfig, run_finetune
    from nara_diffusion.training import load_config

    args = ["--model", str(tiny_base), "--dataset", str(DATA), "--output_dir", str(tmp_path), "--report_to", "none"]
    run_finetune(load_config(FinetuneConfig, [*args, "--max_steps", "3", "--eval_every", "0", *SMALL, *extra]))
    losses = [row["train/loss"] for row in _log(tmp_path) if "train/loss" in row]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)


@pytest.mark.slow
def test_diffora_selection_end_to_end_reloads_with_load_nara_model(tiny_base, finetune_script, tmp_path):
    done = _finetune(
        tiny_base,
        tmp_path,
        "--max_steps",
        "2",
        "--eval_every",
        "0",
        *SMALL,
        "--select",
        "diffora",
        "--sample_rate",
        "0.5",
        "--search_steps",
        "3",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dam = json.loads((tmp_path / "diffora.json").read_text())
    assert len(dam["alphas"]) == 8 and len(dam["kept"]) == 4  # 2 blocks × 4 targets, half kept
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(dam["kept"])
    model = nd.load_nara_model(nd.text.LLaDAModelLM.from_pretrained(tiny_base), tmp_path / "final")
    adapted = sorted(
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, nd.core.NaRALinear)
    )
    assert adapted == sorted(dam["kept"])
    bad = ["--model", str(tiny_base), "--dataset", str(DATA), "--output_dir", str(tmp_path / "bad")]
    assert "sample_rate must be in (0, 1]" in failure_of(
        finetune_script.main, [*bad, "--select", "diffora", "--sample_rate", "1.5"]
    )
