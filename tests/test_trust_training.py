"""Issue #13, the training half: resume never unpickles, survives a kill at any point of any save, replays
exactly with dropout on; seeds make runs reproducible; bad numbers and missing model folders are named early."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from builders import (
    SDXL_EXAMPLE,
    TinyNet,
    dreambooth_config,
    regression_data,
    regression_loss,
    stack_collate,
    tiny_llada_config,
    tiny_sdxl_pipeline,
)
from safetensors.torch import load_file

from nara_diffusion.core import folders
from nara_diffusion.image.dreambooth import run_dreambooth
from nara_diffusion.text import finetune as text_finetune
from nara_diffusion.text.finetune import FinetuneConfig, run_finetune
from nara_diffusion.training import TrainConfig, Trainer, attach_adapter, load_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "llada" / "data" / "toy_addition.json"
IMAGES = SDXL_EXAMPLE / "images"
#: The names accelerate's save_state would use for the state it pickles.
ACCELERATE_NAMES = (
    "custom_checkpoint_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    "pytorch_model.bin",
)


class Killed(BaseException):
    """A simulated SIGKILL: not an Exception, so no clean-up handler runs."""


class _Plant:
    """Unpickling this creates ``path`` (pickle calls ``open(path, "w")``)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(folder: Path, names, marker: Path) -> None:
    payload = pickle.dumps(_Plant(marker))
    for name in names:
        (folder / name).write_bytes(payload)


def _refuse_unpickling(monkeypatch) -> None:
    """From now on, any unpickling (pickle, torch.load) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled during a resume")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _assert_same_tensors(a: Path, b: Path) -> None:
    left, right = _tensors(a), _tensors(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- a tiny LLaDA, trained in-process ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory) -> Path:
    from nara_diffusion.text.llada import LLaDAModelLM
    from nara_diffusion.toy.text import char_tokenizer

    out = tmp_path_factory.mktemp("tiny-llada")
    tok = char_tokenizer()
    config = tiny_llada_config(tok, n_layers=1, max_sequence_length=128)
    torch.manual_seed(0)
    LLaDAModelLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _text_config(model: Path, output_dir: Path, **overrides) -> FinetuneConfig:
    options = dict(
        model=str(model),
        dataset=str(DATA),
        output_dir=str(output_dir),
        max_length=80,
        batch_size=4,
        grad_accum=2,
        val_size=8,
        r=4,
        hidden_dims=[8, 16],
        lora_dropout=0.05,  # the default's dropout: resume must replay its masks too
        learning_rate=1e-2,
        max_steps=6,
        eval_every=3,
        report_to="none",
    )
    options.update(overrides)
    return FinetuneConfig(**options)


def _kill_text_run_in_update(monkeypatch, update: int, grad_accum: int = 2) -> None:
    """Make the next text run die in the middle of ``update`` (after its first micro-batch)."""
    inner, calls = text_finetune._masked_diffusion_step, {"n": 0}

    def dying(model, *args, **kwargs):
        calls["n"] += model.training  # validation runs in eval mode
        if calls["n"] > (update - 1) * grad_accum + 1:
            raise Killed
        return inner(model, *args, **kwargs)

    monkeypatch.setattr(text_finetune, "_masked_diffusion_step", dying)


@pytest.fixture(scope="module")
def text_reference(tiny_llada, tmp_path_factory) -> Path:
    """An uninterrupted 6-update run with dropout 0.05 (checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("text-reference")
    run_finetune(_text_config(tiny_llada, out))
    return out


@pytest.fixture
def killed_text_run(tiny_llada, tmp_path, monkeypatch) -> Path:
    """The reference run killed during update 5: state/ holds update 3, log.jsonl reaches update 4."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill_text_run_in_update(patch, 5)
        with pytest.raises(Killed):
            run_finetune(_text_config(tiny_llada, out))
    assert json.loads((out / "state" / "trainer_state.json").read_text())["global_step"] == 3
    assert max(row["step"] for row in _rows(out)) == 4
    return out


# 3 + 6: dropout on, killed, resumed: the same per-step losses and final weights, bit for bit --------------------
def test_a_killed_and_resumed_text_run_with_dropout_equals_the_uninterrupted_one(
    tiny_llada, text_reference, killed_text_run
):
    run_finetune(_text_config(tiny_llada, killed_text_run, resume=True))
    assert _rows(killed_text_run) == _rows(text_reference)  # every loss equal, and no update logged twice
    _assert_same_tensors(killed_text_run / "final", text_reference / "final")
    _assert_same_tensors(killed_text_run / "best", text_reference / "best")
    _assert_same_tensors(killed_text_run / "state", text_reference / "state")


# 1: resume reads no pickle, whatever the state folder holds ----------------------------------------------------
def test_text_resume_ignores_planted_pickles_and_unpickles_nothing(
    tiny_llada, text_reference, killed_text_run, tmp_path, monkeypatch
):
    marker = tmp_path / "pwned"
    _plant(killed_text_run / "state", ACCELERATE_NAMES, marker)
    _plant(killed_text_run, ACCELERATE_NAMES, marker)
    _refuse_unpickling(monkeypatch)
    run_finetune(_text_config(tiny_llada, killed_text_run, resume=True))
    assert not marker.exists()
    _assert_same_tensors(killed_text_run / "final", text_reference / "final")


def test_every_state_file_replaced_by_a_pickle_is_refused_by_name(tiny_llada, killed_text_run, tmp_path):
    marker = tmp_path / "pwned"
    names = sorted(p.name for p in (killed_text_run / "state").iterdir())
    assert names == ["optimizer.json", "optimizer.safetensors", "trainable.safetensors", "trainer_state.json"]
    for name in names:
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(killed_text_run, copy)
        _plant(copy / "state", [name], marker)
        with pytest.raises(ValueError, match=str(copy / "state" / name).replace(".", r"\.")):
            run_finetune(_text_config(tiny_llada, copy, resume=True))
        assert not marker.exists(), name


def test_a_state_that_does_not_fit_the_run_is_refused_by_name(tiny_llada, killed_text_run):
    with pytest.raises(ValueError, match=r"trainable\.safetensors.*shape"):
        run_finetune(_text_config(tiny_llada, killed_text_run, resume=True, r=2, eval_every=3))
    state = json.loads((killed_text_run / "state" / "trainer_state.json").read_text())
    del state["format"]  # what an older version (accelerate's pickles) left
    (killed_text_run / "state" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"trainer_state\.json.*never loaded"):
        run_finetune(_text_config(tiny_llada, killed_text_run, resume=True))


def test_dreambooth_resume_ignores_planted_pickles_and_unpickles_nothing(tmp_path, monkeypatch):
    config = dreambooth_config(tmp_path, max_steps=2, eval_every=2)
    run_dreambooth(config, pipe=tiny_sdxl_pipeline())
    marker = tmp_path / "pwned"
    _plant(tmp_path / "run" / "state", ACCELERATE_NAMES, marker)
    _refuse_unpickling(monkeypatch)
    result = run_dreambooth(
        dreambooth_config(tmp_path, max_steps=3, eval_every=2, resume=True), pipe=tiny_sdxl_pipeline()
    )
    assert result.global_step == 3 and not marker.exists()
    assert [row["step"] for row in _rows(tmp_path / "run") if "train/loss" in row] == [1, 2, 3]


# 2: a kill at any point of any save ------------------------------------------------------------------------------


def _trainer(output_dir: Path, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = attach_adapter(TinyNet(), "nara", r=4, target_modules=["layers.0", "layers.1"], lora_dropout=0.1)
    options = dict(output_dir=str(output_dir), batch_size=4, grad_accum=2, learning_rate=1e-2, report_to="none")
    options.update(max_steps=6, eval_every=2)
    options.update(overrides)
    return Trainer(
        model, TrainConfig(**options), regression_data(), regression_data(8), stack_collate, regression_loss
    )  # val improves: seen data


@pytest.fixture(scope="module")
def net_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("net-reference")
    _trainer(out).train()
    return out


def _assert_like_reference(out: Path, reference: Path) -> None:
    assert _rows(out) == _rows(reference)
    for name in ("final", "best", "state"):
        _assert_same_tensors(out / name, reference / name)
    assert _hidden(out) == []


SAVE_STEPS = ["tmp_written", "new_complete", "old_renamed", "new_renamed", "removing", "old_removed"]
KILLS = (
    [("state", point, 4) for point in ["state_writing", *SAVE_STEPS]]
    + [("best", point, 4) for point in SAVE_STEPS]
    + [("final", point, 6) for point in ["tmp_written", "new_complete", "new_renamed", "old_removed"]]
)


@pytest.mark.parametrize("folder,point,step", KILLS, ids=[f"{f}-{p}" for f, p, _ in KILLS])
def test_a_kill_at_any_point_of_any_save_resumes_to_the_same_result(
    tmp_path, monkeypatch, net_reference, folder, point, step
):
    out = tmp_path / "run"
    trainer = _trainer(out)
    fired: list[str] = []

    def kill_point(name: str, dst: Path) -> None:
        if not fired and name == point and dst.name.strip(".").split(".")[0] == folder and trainer.global_step == step:
            fired.append(name)
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(folders, "_kill_point", kill_point)
        with pytest.raises(Killed):
            trainer.train()
    assert fired
    folders.recover(out / "best")  # best/ is never lost, even mid-swap
    assert (out / "best" / "adapter_model.safetensors").is_file()
    _trainer(out, resume=True).train()
    _assert_like_reference(out, net_reference)


def _killed_net_run(out: Path, update: int) -> None:
    trainer = _trainer(out)
    inner, calls = trainer.loss_fn, {"n": 0}

    def dying(model, batch, gen):
        calls["n"] += model.training
        if calls["n"] > (update - 1) * 2 + 1:
            raise Killed
        return inner(model, batch, gen)

    trainer.loss_fn = dying
    with pytest.raises(Killed):
        trainer.train()


def test_half_deleted_and_half_written_leftovers_do_not_brick_the_folder(tmp_path, net_reference):
    out = tmp_path / "run"
    _killed_net_run(out, 5)  # state/ and best/ hold update 4
    old = out / ".state.old"
    shutil.copytree(out / "state", old)
    (old / "trainer_state.json").unlink()  # a removal killed part way
    half = out / ".state.tmp"
    shutil.copytree(out / "state", half)
    (half / "trainable.safetensors").write_bytes(b"\0" * 10)  # a write killed part way
    shutil.copytree(out / "best", out / ".best.old")
    next(iter((out / ".best.old").glob("*.safetensors"))).unlink()
    _trainer(out, resume=True).train()
    _assert_like_reference(out, net_reference)


def test_a_kill_between_the_two_renames_loses_neither_state_nor_best(tmp_path, net_reference):
    out = tmp_path / "run"
    _killed_net_run(out, 5)
    (out / "state").rename(out / ".state.old")  # moved aside; the new copy never arrived
    (out / "best").rename(out / ".best.old")
    _trainer(out, resume=True).train()
    _assert_like_reference(out, net_reference)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, net_reference):
    out = tmp_path / "run"
    _killed_net_run(out, 2)
    assert not (out / "state").exists() and (out / "log.jsonl").is_file()
    _trainer(out, resume=True).train()
    _assert_like_reference(out, net_reference)


def test_write_atomically_recovers_every_leftover_and_keeps_the_newest_complete_copy(tmp_path):
    def fill(text: str):
        return lambda folder: (folder / "f.txt").write_text(text)

    dst = tmp_path / "final"
    folders.write_atomically(dst, fill("one"))
    _, new, old = folders.siblings(dst)
    dst.rename(old)
    new.mkdir()
    (new / "f.txt").write_text("two")  # a complete new copy, killed before it was moved in
    folders.recover(dst)
    assert (dst / "f.txt").read_text() == "two" and _hidden(tmp_path) == []
    with pytest.raises(OSError, match="disk full"):
        folders.write_atomically(dst, lambda folder: (_ for _ in ()).throw(OSError("disk full")))
    assert (dst / "f.txt").read_text() == "two" and _hidden(tmp_path) == []


# 6: the log after a resume --------------------------------------------------------------------------------------
def test_the_log_of_a_resumed_run_drops_the_replayed_updates_and_a_cut_line(tmp_path, net_reference):
    out = tmp_path / "run"
    _killed_net_run(out, 6)  # checkpoint at 4, updates 5 logged, 6 died
    with open(out / "log.jsonl", "a") as fh:
        fh.write('{"step": 6, "train/lo')  # the kill cut a line
    _trainer(out, resume=True).train()
    assert _rows(out) == _rows(net_reference)


# 4: --seed alone decides the run ---------------------------------------------------------------------------------
def test_the_same_text_seed_gives_the_same_adapter_whatever_ran_before(tiny_llada, tmp_path):
    outputs = []
    for name, before, seed in (("a", 1, 7), ("b", 2, 7), ("c", 1, 8)):
        torch.manual_seed(before)
        torch.rand(5)
        run_finetune(_text_config(tiny_llada, tmp_path / name, seed=seed, max_steps=2, eval_every=0))
        outputs.append(tmp_path / name / "final")
    _assert_same_tensors(outputs[0], outputs[1])
    other = _tensors(outputs[2])  # another seed: another adapter (the comparison is not vacuous)
    assert any(not torch.equal(v, other[k]) for k, v in _tensors(outputs[0]).items())


@pytest.mark.parametrize("adapter", ["nara", "lora"])
def test_the_same_dreambooth_seed_gives_the_same_adapter_whatever_ran_before(tmp_path, adapter):
    finals = []
    for before in (1, 2):
        torch.manual_seed(before)
        config = dreambooth_config(tmp_path / str(before), adapter=adapter, lora_dropout=0.05, max_steps=2)
        finals.append(run_dreambooth(config, pipe=tiny_sdxl_pipeline()).final_dir)
    _assert_same_tensors(*finals)


# 5: numbers no run can use are refused before anything loads --------------------------------------------------
BAD_NUMBERS = [  # flag, value, what the error says after "--flag must be"
    ("max_steps", "0", r"an integer >= 1, or leave it unset to train for --epochs, got 0"),
    ("max_steps", "-5", r"an integer >= 1, or leave it unset"),
    ("epochs", "0", r"an integer >= 1"),
    ("learning_rate", "0", r"a finite number in \(0, inf\)"),
    ("learning_rate", "nan", r"a finite number in \(0, inf\)"),
    ("batch_size", "0", r"an integer >= 1"),
    ("grad_accum", "0", r"an integer >= 1"),
    ("warmup_ratio", "1.5", r"a finite number in \[0, 1\]"),
    ("eval_every", "-1", r"an integer >= 0 \(0 turns validation and checkpoints off\)"),
    ("max_grad_norm", "-1", r"a finite number in \[0, inf\) \(0 turns clipping off\)"),
    ("weight_decay", "-0.1", r"a finite number in \[0, inf\)"),
    ("adam_beta2", "1", r"a finite number in \[0, 1\)"),
    ("seed", "-1", r"an integer >= 0"),
    ("num_workers", "-1", r"an integer >= 0"),
    ("r", "0", r"an integer >= 1"),
    ("lora_dropout", "1", r"a finite number in \[0, 1\)"),
    ("scaling", "0", r"a finite number in \(0, inf\)"),
    ("mask_eps", "0", r"a finite number in \(0, 1\)"),
    ("max_length", "0", r"an integer >= 1"),
    ("val_size", "-1", r"an integer >= 0"),
    ("test_block_length", "0", r"an integer >= 1"),
    ("hidden_dims", "8,0", r"an integer >= 1, got 0"),
]


@pytest.mark.parametrize("flag,value,message", BAD_NUMBERS, ids=[f"{f}={v}" for f, v, _ in BAD_NUMBERS])
def test_a_bad_number_is_named_before_anything_happens(tmp_path, flag, value, message):
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "nowhere"), "--dataset", str(DATA), "--output_dir", str(out)]
    with pytest.raises(ValueError, match=f"--{flag} must be {message}"):
        load_config(FinetuneConfig, [*args, f"--{flag}", value])
    assert not out.exists()


@pytest.mark.parametrize(
    "flag,value",
    [("max_steps", 0), ("num_inference_steps", 0), ("sample_batch_size", 0), ("text_encoder_lr", -1.0), ("r", 0)],
)
def test_a_bad_dreambooth_number_is_named(tmp_path, flag, value):
    with pytest.raises(ValueError, match=f"--{flag} must be"):
        dreambooth_config(tmp_path, **{flag: value})


def test_max_steps_unset_still_trains_for_the_epochs(tmp_path):
    assert load_config(TrainConfig, ["--max_steps", "none"]).max_steps is None
    trainer = _trainer(tmp_path, max_steps=None, epochs=2, eval_every=0)
    assert trainer.total_updates == 2 * 3  # 24 examples / batch 4 / accumulation 2, twice


def test_a_config_changed_after_construction_is_checked_before_loading(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a model for an invalid config")

    monkeypatch.setattr(text_finetune, "load_base_model", must_not_load)
    config = _text_config(tmp_path / "nowhere", tmp_path / "out")
    config.max_steps = 0
    with pytest.raises(ValueError, match="--max_steps must be an integer >= 1"):
        run_finetune(config)
    image = dreambooth_config(tmp_path)
    image.grad_accum = 0
    with pytest.raises(ValueError, match="--grad_accum must be"):
        run_dreambooth(image)  # would load the SDXL base from the Hub
    trainer_config = TrainConfig(output_dir=str(tmp_path / "net"))
    trainer_config.max_steps = -5
    torch.manual_seed(0)
    model = attach_adapter(TinyNet(), "nara", r=4, target_modules=["layers.0"])
    with pytest.raises(ValueError, match="--max_steps"):
        Trainer(model, trainer_config, regression_data(), None, stack_collate, regression_loss)
    assert not (tmp_path / "out").exists() and not (tmp_path / "net").exists() and not (tmp_path / "run").exists()


# 7: a missing local model folder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/no/such/llada", "./no-such-llada", "models/no/such", "~/no-such-llada-here"])
def test_a_missing_local_model_folder_is_named(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=r"no such folder.*or a Hub id like GSAI-ML/LLaDA-8B-Instruct"):
        run_finetune(_text_config(name, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_missing_local_pipeline_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model /no/such/pipeline: no such folder.*stable-diffusion-xl"):
        run_dreambooth(dreambooth_config(tmp_path, model="/no/such/pipeline"))
    with pytest.raises(FileNotFoundError, match=r"--vae \./no-vae: no such folder"):
        run_dreambooth(dreambooth_config(tmp_path, model=str(tmp_path), vae="./no-vae"))
    assert not (tmp_path / "run").exists()
