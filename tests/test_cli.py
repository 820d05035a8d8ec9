"""Issue #14, the command lines: self-explaining ``--help``, diffusers' flag names, one meaning per name, resume and
checkpoint limits as users know them, ``--push_to_hub`` (up to the upload call; no network)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from builders import example_module

from nara_diffusion.image.dreambooth import DreamBoothConfig
from nara_diffusion.text.finetune import FinetuneConfig
from nara_diffusion.training import TrainConfig, load_config
from nara_diffusion.training.config import build_parser, field_aliases

ROOT = Path(__file__).resolve().parents[1]
SDXL = ROOT / "examples" / "sdxl_dreambooth"
LLADA = ROOT / "examples" / "llada"


def _script(path: Path) -> ModuleType:
    """Import an example script by path (the examples are not a package; evaluate.py imports generate.py)."""
    return example_module(path, f"cli_example_{path.parent.name}_{path.stem}")


def _help_blocks(text: str) -> dict[str, str]:
    """``--flag`` -> its whole entry in ``--help`` (the option line and the wrapped help under it), spaces folded."""
    blocks: dict[str, str] = {}
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for entry in entries:
        flat = " ".join(entry.split())
        for flag in re.findall(r"(?:^|, )(--\w+)", flat):
            blocks[flag] = flat
    return blocks


def _shown(value) -> str:
    return "None" if value is None else str(value)


# -- 1: --help explains every field ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "script,cls",
    [(LLADA / "finetune.py", FinetuneConfig), (SDXL / "train.py", DreamBoothConfig)],
    ids=["llada", "sdxl"],
)
def test_help_shows_help_default_and_choices_of_every_field(script, cls, capsys):
    with pytest.raises(SystemExit) as done:
        _script(script).main(["--help"])
    assert done.value.code == 0
    blocks = _help_blocks(capsys.readouterr().out)
    for f in dataclasses.fields(cls):
        block = blocks.get(f"--{f.name}")
        assert block is not None, f"--{f.name} is missing from --help"
        words = "".join(f.metadata["help"].split())  # argparse wraps lines (also after hyphens): compare unspaced
        assert words and words in "".join(block.split()), (f.name, block)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"(default: {_shown(default)})" in block, (f.name, block)  # whole: wrapped at spaces only
        for choice in f.metadata.get("choices", ()):
            assert ("none" if choice is None else str(choice)) in block.split("Choices:")[1], (f.name, block)
    assert "diffora" in blocks["--select"]  # the example: a value the old help never named
    assert "--config" in blocks


def test_one_spelling_per_flag_and_every_alias_resolves_to_one_field():
    for cls in (FinetuneConfig, DreamBoothConfig):
        parser = build_parser(cls)
        flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
        assert len(flags) == len(set(flags))
        assert not [s for s in flags if "-" in s[2:]], "kebab-case twins of snake_case flags"
        aliases = field_aliases(cls)
        assert not set(aliases) & {f.name for f in dataclasses.fields(cls)}  # an alias never names another field
    assert field_aliases(DreamBoothConfig)["rank"] == "r"
    assert field_aliases(DreamBoothConfig)["pretrained_model_name_or_path"] == "model"


# -- 2: a command copied from diffusers' README -------------------------------------------------------------------
DIFFUSERS_FLAGS = {
    "instance_prompt": "a photo of sks toy",
    "class_prompt": "a photo of a circle",
    "prior_loss_weight": "1.0",
    "num_class_images": "2",
    "resolution": "32",
    "rank": "4",
    "train_batch_size": "2",
    "gradient_accumulation_steps": "1",
    "max_train_steps": "2",
    "learning_rate": "1e-4",
    "lr_scheduler": "constant",
    "lr_warmup_steps": "0",
    "checkpointing_steps": "1",
    "checkpoints_total_limit": "2",
    "mixed_precision": "no",
    "seed": "0",
    "validation_prompt": "a photo of sks toy on a green background",
    "report_to": "none",
}


def _diffusers_command(tmp_path: Path, **changes: str) -> list[str]:
    flags = {
        "pretrained_model_name_or_path": str(SDXL / "toy"),
        "instance_data_dir": str(SDXL / "images"),
        "class_data_dir": str(tmp_path / "class"),
        "output_dir": str(tmp_path / "run"),
        **DIFFUSERS_FLAGS,
        **changes,
    }
    return [f"--{k}={v}" for k, v in flags.items()] + ["--with_prior_preservation", "--num_inference_steps=2"]


def test_diffusers_names_mean_our_fields(tmp_path):
    config = load_config(DreamBoothConfig, _diffusers_command(tmp_path))
    assert (config.model, config.r, config.batch_size, config.grad_accum) == (str(SDXL / "toy"), 4, 2, 1)
    assert (config.max_steps, config.lr_schedule, config.lr_warmup_steps, config.eval_every) == (2, "constant", 0, 1)
    assert config.checkpoints_total_limit == 2 and config.with_prior_preservation and config.mixed_precision == "no"
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train_batch_size: 3\nrank: 8\n")
    config = load_config(DreamBoothConfig, [*_diffusers_command(tmp_path), "--config", str(yaml_file)])
    assert (config.batch_size, config.r) == (2, 4)  # the command line wins over the file, whatever the spelling
    yaml_file.write_text("train_batch_size: 3\nbatch_size: 4\n")
    with pytest.raises(ValueError, match="batch_size is given twice"):
        load_config(
            DreamBoothConfig, ["--config", str(yaml_file), "--instance_data_dir", "x", "--instance_prompt", "y"]
        )


def test_a_diffusers_command_trains_resumes_and_pushes(tmp_path, monkeypatch, one_thread):
    import huggingface_hub

    uploads: list[dict] = []

    def create_repo(repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(*, repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*")}
        uploads.append({"repo_id": repo_id, "files": files})

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    train = _script(SDXL / "train.py")
    train.main(_diffusers_command(tmp_path, max_train_steps="2"))
    run = tmp_path / "run"
    assert (run / "final" / "nara_weights.safetensors").is_file() and (run / "state").is_dir()
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-000002.png"]
    card = (run / "final" / "README.md").read_text()
    assert "5 instance images" in card and "**steps**: 2" in card and str(tmp_path) not in card

    command = _diffusers_command(tmp_path, max_train_steps="3")
    train.main([*command, "--resume_from_checkpoint", "latest", "--push_to_hub", "--hub_model_id", "me/sks-toy"])
    steps = [
        row["step"] for row in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "train/loss" in row
    ]
    assert steps == [1, 2, 3]  # resumed after update 2, not started again
    (upload,) = uploads
    assert upload["repo_id"] == "me/sks-toy" and "nara_weights.safetensors" in upload["files"]
    assert all(str(tmp_path).encode() not in content for content in upload["files"].values())


def test_lora_dreambooth_final_folder_gets_a_card(tmp_path):
    from nara_diffusion.image.dreambooth import card_facts, write_lora_card

    config = load_config(DreamBoothConfig, [*_diffusers_command(tmp_path), "--adapter", "lora"])
    path = write_lora_card(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0", card_facts(config, 7))
    text = path.read_text()
    assert text.startswith("---\nlibrary_name: diffusers\nbase_model: stabilityai/stable-diffusion-xl-base-1.0\n")
    assert "load_lora_weights" in text and "- steps: 7" in text and "5 instance images" in text


def test_text_run_writes_scores_to_the_card_and_pushes_no_local_path(tmp_path, monkeypatch, one_thread):
    from nara_diffusion.training import hub

    pushed: list[tuple] = []

    def push(folder, repo_id=None, *, base_model=None, **kwargs):
        copy = hub.publishable_copy(folder, tmp_path / "published", base_model)
        pushed.append((repo_id, json.loads((copy / "adapter_config.json").read_text())))
        return repo_id

    monkeypatch.setattr("nara_diffusion.text.finetune.push_folder_to_hub", push)
    finetune = _script(LLADA / "finetune.py")
    data = LLADA / "data"
    finetune.main(
        [
            *("--pretrained_model_name_or_path", str(LLADA / "toy"), "--dataset", str(data / "toy_amp_train.json")),
            *("--output_dir", str(tmp_path / "run"), "--max_train_steps", "2", "--train_batch_size", "4"),
            *("--gradient_accumulation_steps", "1", "--val_size", "0", "--max_length", "72", "--rank", "4"),
            *("--test_dataset", str(data / "toy_amp_test.json"), "--test_size", "4", "--test_kind", "exact"),
            *("--test_gen_length", "8", "--test_block_length", "8", "--report_to", "none"),
            *("--push_to_hub", "--hub_model_id", "me/toy-nara"),
        ]
    )
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "test_accuracy_before" in card and "test_accuracy_after" in card and "toy_amp_train.json" in card
    assert str(tmp_path) not in card and str(LLADA) not in card
    ((repo_id, uploaded),) = pushed
    recorded = uploaded["base_model_name_or_path"]
    assert repo_id == "me/toy-nara" and (recorded is None or not Path(recorded).exists())


# -- 3: resume and the checkpoint limit as accelerate / diffusers users know them -----------------------------------
def test_resume_from_checkpoint_latest_path_or_false(tmp_path):
    run = tmp_path / "run"
    base = ["--output_dir", str(run)]
    assert load_config(TrainConfig, [*base, "--resume_from_checkpoint", "latest"]).resume is True
    assert load_config(TrainConfig, [*base, "--resume_from_checkpoint", str(run / "state")]).resume is True
    assert load_config(TrainConfig, [*base, "--resume_from_checkpoint", str(run)]).resume is True
    assert load_config(TrainConfig, [*base, "--resume_from_checkpoint", "false"]).resume is False
    with pytest.raises(ValueError, match="keeps one resumable state per run"):
        load_config(TrainConfig, [*base, "--resume_from_checkpoint", str(tmp_path / "other" / "checkpoint-500")])


def test_checkpoint_limit_and_warmup_steps(tmp_path):
    with pytest.raises(ValueError, match="--checkpoints_total_limit must be an integer >= 1"):
        load_config(TrainConfig, ["--checkpoints_total_limit", "0"])
    config = load_config(TrainConfig, ["--max_train_steps", "10", "--lr_warmup_steps", "4"])
    assert config.warmup_fraction(10) == 0.4 and config.warmup_fraction(2) == 1.0
    assert TrainConfig().warmup_fraction(10) == TrainConfig.warmup_ratio
    with pytest.raises(ValueError, match="--hub_model_id names where --push_to_hub uploads"):
        TrainConfig(hub_model_id="me/x")


def test_unknown_flags_are_rejected_with_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        load_config(DreamBoothConfig, ["--instance_data_dir", "x", "--instance_prompt", "y", "--lora_rank", "4"])
    err = capsys.readouterr().err
    assert "--lora_rank" in err and "valid fields" in err and "instance_prompt" in err


# -- 3: one meaning per name across the scripts -------------------------------------------------------------------
def test_adapter_is_a_kind_and_adapter_path_a_folder_in_every_script():
    for script in (LLADA / "generate.py", LLADA / "evaluate.py", SDXL / "infer.py"):
        text = script.read_text()
        assert '"--adapter_path"' in text and '"--adapter"' not in text, script
        assert '"--output"' not in text and '"--out"' not in text and '"--out_dir"' not in text, script
    for cls in (FinetuneConfig, DreamBoothConfig):
        adapter = next(f for f in dataclasses.fields(cls) if f.name == "adapter")
        assert {"nara", "lora"} <= set(adapter.metadata["choices"])
    evaluate = _script(LLADA / "evaluate.py")
    assert evaluate.label_adapters(["out/nara/final", "runs/lora"], include_base=True) == {
        "base": None,
        "nara": "out/nara/final",
        "lora": "runs/lora",
    }
    assert evaluate.label_adapters([], include_base=False) == {"base": None}
    with pytest.raises(SystemExit, match=r"labelled 'nara'"):
        evaluate.label_adapters(["a/nara/final", "b/nara/final"], include_base=False)


def test_benchmark_and_example_flags_are_snake_case():
    scripts = [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/**/*.py")]
    for script in scripts:
        kebab = re.findall(r"""["'](--[a-z0-9]+-[a-z0-9-]+)["']""", script.read_text())
        assert not kebab, (script, kebab)
