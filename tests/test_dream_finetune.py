"""Masked-diffusion SFT of Dream: the shifted objective against hand-computed values, and one fine-tuning step with each
adapter kind on a tiny Dream folder whose family is read from its config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from builders import save_hub_dream, tiny_chat_tokenizer, tiny_dream
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import MaskedLMOutput

import nara_diffusion as nd
from nara_diffusion.text.dream import DreamModel
from nara_diffusion.text.finetune import FinetuneConfig, run_finetune
from nara_diffusion.text.loading import load_adapter
from nara_diffusion.text.objectives import logits_at, sft_loss

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "llada" / "data" / "toy_addition.json"


class NextTokenOracle(nn.Module):
    """A model of a shifted family (``logits_shift = 1``) whose output at position i puts logit log 3 on the clean token
    at i + 1 and 0 on every other token, so the cross-entropy of a token read at the right row is log(V + 2) − log 3,
    and log(V + 2) at any other row (the clean tokens of a row are all different)."""

    logits_shift = 1

    def __init__(self, clean: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.clean, self.vocab = clean, vocab
        self.calls: list[dict] = []

    def forward(self, input_ids: torch.Tensor, logits_positions: torch.Tensor | None = None) -> MaskedLMOutput:
        self.calls.append({"logits_positions": logits_positions})
        nxt = torch.cat([self.clean[:, 1:], self.clean[:, :1]], dim=1)  # the token each row predicts
        logits = F.one_hot(nxt, self.vocab).float() * math.log(3)
        return MaskedLMOutput(logits=logits if logits_positions is None else logits[logits_positions])


def test_the_shifted_objective_reads_each_masked_token_from_the_row_before_it():
    vocab, t = 12, torch.tensor([0.5, 0.25])
    clean = torch.stack([torch.randperm(vocab)[:8] for _ in range(2)])  # distinct tokens within a row
    prompts = torch.tensor([3, 4])
    model = NextTokenOracle(clean, vocab)
    out = sft_loss(model, clean, prompts, mask_token_id=vocab - 1, t=t, generator=torch.Generator().manual_seed(0))
    # exactly ⌈t · answer⌉ masked: ⌈0.5 · 5⌉ = 3 and ⌈0.25 · 4⌉ = 1; each costs log(V + 2) − log 3 when read from the
    # row before it; per example Σ CE / t / answer length, averaged over the batch
    ce = math.log(vocab + 2) - math.log(3)
    expected = (3 * ce / 0.5 / 5 + 1 * ce / 0.25 / 4) / 2
    assert out.batch.num_masked.tolist() == [3, 1]
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    # the model was asked for the rows before the masked positions (its fast path), not for the masked rows
    asked = model.calls[-1]["logits_positions"]
    assert torch.equal(asked[:, :-1], out.batch.masked[:, 1:]) and not asked[:, -1].any()
    # a masked position 0 has no row before it: it reads row 0 (Dream's convention), from full logits
    positions = torch.zeros_like(clean, dtype=torch.bool)
    positions[0, [0, 1]] = True
    rows = logits_at(model, clean, positions)
    assert model.calls[-1]["logits_positions"] is None
    assert rows.argmax(-1).tolist() == [clean[0, 1].item(), clean[0, 1].item()]


def test_the_objective_on_a_tiny_dream_equals_the_shifted_full_logits_computation():
    model = tiny_dream()
    clean = torch.randint(0, 18, (2, 10), generator=torch.Generator().manual_seed(3))
    prompts = torch.tensor([3, 5])
    t = torch.tensor([0.6, 0.3])
    out = sft_loss(model, clean, prompts, mask_token_id=19, t=t, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(out.batch.noisy_ids).logits  # unshifted: row i predicts token i + 1
    per_example = []
    for b in range(2):
        cols = out.batch.masked[b].nonzero()[:, 0]
        ce = F.cross_entropy(full[b, cols - 1], clean[b, cols], reduction="sum")
        per_example.append(ce / t[b] / (10 - prompts[b]))
    # the same logits rows (one head GEMM over 32 at logits ≤ 5) and a sum of ≤ 7 cross-entropies: float32 rounding
    torch.testing.assert_close(out.loss.detach(), torch.stack(per_example).mean(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def dream_folder(tmp_path_factory) -> Path:
    """A tiny Dream saved as on the Hub (auto_map to remote code, Hub key names) with a chat tokenizer."""
    tokenizer = tiny_chat_tokenizer()
    return save_hub_dream(tiny_dream(scale=0.1, tokenizer=tokenizer), tmp_path_factory.mktemp("dream"), tokenizer)


def _config(folder: Path, out: Path, **overrides) -> FinetuneConfig:
    options = dict(
        model=str(folder), dataset=str(DATA), output_dir=str(out), max_length=48, batch_size=4, grad_accum=1,
        val_size=0, r=2, hidden_dims=[8], learning_rate=1e-2, max_steps=1, eval_every=0, report_to="none",
    )  # fmt: skip
    options.update(overrides)
    return FinetuneConfig(**options)


@pytest.mark.parametrize(
    "overrides",
    [
        {"adapter": "nara"},
        {"adapter": "nara-c"},
        {"adapter": "lora", "target_modules": ["all-linear"]},
        {"adapter": "full"},
        {"adapter": "multi-lora", "bins": 2},
        {"adapter": "nara", "objective": "lift"},
    ],
    ids=["nara", "nara-c", "lora-all-linear", "full", "multi-lora", "nara-lift"],
)
def test_one_finetuning_step_with_each_adapter_on_a_dream_folder(dream_folder, tmp_path, overrides):
    result = run_finetune(_config(dream_folder, tmp_path, **overrides))
    final = result.final_dir
    rows = [json.loads(line) for log in sorted(tmp_path.rglob("log.jsonl")) for line in log.read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    steps = 2 if overrides.get("bins") else 1  # one update per noise bin
    assert result.global_step == len(losses) == steps and all(math.isfinite(v) and v > 0 for v in losses)
    if overrides["adapter"] == "full":
        assert type(AutoModel.from_pretrained(final)) is DreamModel
        return
    loaded = load_adapter(DreamModel.from_pretrained(dream_folder), final)
    if overrides["adapter"].startswith("nara"):
        targets = json.loads((final / "adapter_config.json").read_text())["target_modules"]
        assert sorted(targets) == ["k_proj", "o_proj", "q_proj", "v_proj"]  # the recipe's attn_out, in Dream's names
        assert nd.is_nara_model(loaded)
    if overrides["adapter"] == "lora":
        names = {n for n, m in loaded.named_modules() if type(m).__name__ == "Linear" and "lora_A" not in n}
        assert not any(n.endswith("lm_head.base_layer") for n in names)  # all-linear leaves the head alone


@pytest.mark.slow
def test_finetune_script_detects_dream_from_the_folder(dream_folder, tmp_path):
    import os
    import subprocess
    import sys

    args = ["--model", str(dream_folder), "--dataset", str(DATA), "--output_dir", str(tmp_path), "--max_length", "48"]
    args += ["--batch_size", "4", "--grad_accum", "1", "--val_size", "4", "--r", "2", "--max_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = ROOT / "examples" / "llada" / "finetune.py"
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model family Dream: mask token 23, logits shift 1" in done.stderr
    assert "done: 2 updates" in done.stdout
    loaded = load_adapter(DreamModel.from_pretrained(dream_folder), tmp_path / "final")
    assert nd.is_nara_model(loaded)


def test_nara_on_dream_receives_each_examples_noise_level(monkeypatch):
    from nara_diffusion.core.adapter import NoiseConditionedAdapter

    seen, begin = [], NoiseConditionedAdapter.begin_forward

    def recording(self, noise_level):
        seen.append(noise_level.clone())
        return begin(self, noise_level)

    monkeypatch.setattr(NoiseConditionedAdapter, "begin_forward", recording)
    model = nd.get_nara_model(tiny_dream(), nd.NaRAConfig(r=2, target_modules=["q_proj"], hidden_dims=[8]))
    clean = torch.randint(0, 18, (2, 10), generator=torch.Generator().manual_seed(3))
    sft_loss(model, clean, torch.tensor([3, 5]), mask_token_id=19, t=torch.tensor([0.3, 0.9]))
    assert len(seen) == 1 and torch.equal(seen[0].float(), torch.tensor([0.3, 0.9]))  # λ = t, one per example
