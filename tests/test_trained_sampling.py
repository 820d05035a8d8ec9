"""Issue #15, item 1: an adapter is evaluated as it was trained (its answer length in ``sampling.json``), and a caller
asking for another length is warned; folders without the file keep today's defaults."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from builders import tiny_llada_config

import nara_diffusion as nd
from nara_diffusion.core.folders import SAMPLING_CONFIG_NAME
from nara_diffusion.text import prompting
from nara_diffusion.text.data import encode_prompts, to_prompt_answer
from nara_diffusion.text.finetune import FinetuneConfig, run_finetune
from nara_diffusion.text.loading import load_for_inference
from nara_diffusion.text.scoring import evaluate_generation
from nara_diffusion.text.trained_sampling import (
    read_sampling_record,
    sampler_settings,
    trained_sampling,
    write_sampling_record,
)
from nara_diffusion.toy import text as toy

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return toy.train_records(["amp"], 24, seed=1)


@pytest.fixture(scope="module")
def prompt_length(records) -> int:
    tok = toy.char_tokenizer()
    lengths = {len(ids) for ids in encode_prompts(tok, [p.prompt for p in to_prompt_answer(records)])}
    assert len(lengths) == 1  # every "What is a&b?" prompt has the same length
    return lengths.pop()


class Spy:
    """Patches the sampler `generate_texts` calls, recording every call's settings."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        real = prompting.generate

        def fake(model, ids, **kwargs):
            self.calls.append(kwargs)
            return real(model, ids, **kwargs)

        monkeypatch.setattr(prompting, "generate", fake)


@pytest.fixture
def spy(monkeypatch) -> Spy:
    return Spy(monkeypatch)


#: The sampler settings of the run's before/after test (filled by the `trained` fixture).
RUN_CALLS: list[dict] = []


@pytest.fixture(scope="module")
def trained(tmp_path_factory, records) -> Path:
    """A 2-update NaRA run on a tiny LLaDA; returns its output folder."""
    from nara_diffusion.text.llada import LLaDAModelLM

    root = tmp_path_factory.mktemp("trained-sampling")
    base = root / "base"
    tok = toy.char_tokenizer()
    torch.manual_seed(0)
    LLaDAModelLM(tiny_llada_config(tok, n_layers=1)).save_pretrained(base)
    tok.save_pretrained(base)
    data = root / "train.json"
    data.write_text(json.dumps(records))
    test = root / "test.json"
    test.write_text(json.dumps(toy.test_records("amp", 2)))
    config = FinetuneConfig(
        model=str(base),
        dataset=str(data),
        test_dataset=str(test),
        test_kind="exact",
        output_dir=str(root / "run"),
        max_length=MAX_LENGTH,
        batch_size=4,
        val_size=0,
        eval_every=0,
        r=2,
        hidden_dims=[4],
        max_steps=2,
        report_to="none",
    )
    with pytest.MonkeyPatch.context() as patch:
        watch = Spy(patch)
        run_finetune(config)
    RUN_CALLS.extend(watch.calls)
    return root / "run"


def test_the_folder_records_the_trained_length(trained, prompt_length):
    record = json.loads((trained / "final" / SAMPLING_CONFIG_NAME).read_text())
    assert record["gen_length"] == MAX_LENGTH - prompt_length
    assert record["padding"] == "eos" and record["max_length"] == MAX_LENGTH
    assert record["answer_positions"] == [MAX_LENGTH - prompt_length] * 2
    assert "gen_length" not in json.loads((trained / "final" / "adapter_config.json").read_text())


def test_the_record_round_trips(trained, tmp_path):
    record = read_sampling_record(trained / "final")
    write_sampling_record(tmp_path, record)
    assert read_sampling_record(tmp_path) == record
    model, _ = load_for_inference(trained / "final")
    assert trained_sampling(model) == record


def test_the_runs_own_test_samples_at_the_trained_length(trained, prompt_length):
    """run_finetune's before/after test, with no test_gen_length: the trained length, one block, a token a step."""
    assert len(RUN_CALLS) == 2  # before and after, one batch each
    for call in RUN_CALLS:
        assert call["gen_length"] == call["block_length"] == call["steps"] == MAX_LENGTH - prompt_length


def test_evaluation_without_settings_uses_the_trained_length(trained, prompt_length, spy):
    watch = spy
    model, tok = load_for_inference(trained / "final")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_generation(model, tok, toy.test_records("amp", 3), kind="exact")
    assert {c["gen_length"] for c in watch.calls} == {MAX_LENGTH - prompt_length}
    assert {c["block_length"] for c in watch.calls} == {MAX_LENGTH - prompt_length}


def test_another_length_warns_once(trained, prompt_length, spy):
    watch = spy
    model, tok = load_for_inference(trained / "final")
    with pytest.warns(UserWarning, match=f"trained to fill {MAX_LENGTH - prompt_length} answer positions"):
        evaluate_generation(model, tok, toy.test_records("amp", 2), kind="exact", gen_length=8, steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_generation(model, tok, toy.test_records("amp", 2), kind="exact", gen_length=8, steps=8)
    assert {c["gen_length"] for c in watch.calls} == {8}


def test_a_folder_without_the_file_keeps_todays_defaults(trained, tmp_path, spy):
    folder = tmp_path / "old"
    shutil.copytree(trained / "final", folder)
    (folder / SAMPLING_CONFIG_NAME).unlink()
    watch = spy
    model, tok = load_for_inference(folder)
    assert trained_sampling(model) is None
    fallback = {"gen_length": 256, "steps": 256, "block_length": 8}
    assert sampler_settings(model, {"gen_length": None, "steps": None}, fallback=fallback) == fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_generation(model, tok, toy.test_records("amp", 2), kind="exact", gen_length=8, steps=8)
    assert {c["gen_length"] for c in watch.calls} == {8}


def test_the_lm_eval_model_defaults_to_the_trained_length(trained, prompt_length, tmp_path):
    pytest.importorskip("lm_eval")
    from nara_diffusion.text.lm_eval_model import NaRALLaDA

    length = MAX_LENGTH - prompt_length
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm = NaRALLaDA(adapter=str(trained / "final"), dtype="float32", device="cpu")
    assert {k: lm.gen_kwargs[k] for k in ("gen_length", "steps", "block_length")} == dict.fromkeys(
        ("gen_length", "steps", "block_length"), length
    )
    with pytest.warns(UserWarning, match="trained to fill"):
        NaRALLaDA(adapter=str(trained / "final"), dtype="float32", device="cpu", gen_length="8", block_length="8")
    old = tmp_path / "old"
    shutil.copytree(trained / "final", old)
    (old / SAMPLING_CONFIG_NAME).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm = NaRALLaDA(adapter=str(old), dtype="float32", device="cpu")
    assert (lm.gen_kwargs["gen_length"], lm.gen_kwargs["steps"], lm.gen_kwargs["block_length"]) == (256, 256, 8)


def test_a_damaged_sampling_record_is_named(tmp_path):
    (tmp_path / "sampling.json").write_bytes(b'{"gen_length": 3')
    with pytest.raises(nd.NaRALoadError, match=r"sampling\.json"):
        read_sampling_record(tmp_path)
