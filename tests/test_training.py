"""The shared accelerate loop: what it trains, its schedule, resume, atomic checkpoints and config files."""

from __future__ import annotations

import json

import pytest
import torch
from builders import TinyNet, regression_data, regression_loss, stack_collate

import nara_diffusion as nd
from nara_diffusion.training import TrainConfig, Trainer, attach_adapter, linear_warmup_decay, load_config


def _trainer(tmp_path, adapter="nara", **overrides) -> Trainer:
    torch.manual_seed(0)
    model = attach_adapter(TinyNet(), adapter, r=4, target_modules=["layers.0", "layers.1"], lora_dropout=0.0)
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=4, grad_accum=2, learning_rate=1e-2, report_to="none")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    loss = regression_loss if adapter.startswith("nara") else (lambda m, b, g: (m(b["x"]) - b["y"]).pow(2).mean())
    return Trainer(model, cfg, regression_data(), regression_data(8, seed=1), stack_collate, loss)


def _log(tmp_path, key="train/loss") -> list[float]:
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def test_one_step_changes_only_adapter_parameters(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, eval_every=0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("nara_" in n for n in changed)
    assert any("nara_hypernet" in n for n in changed) and any("nara_B" in n for n in changed)
    # the final adapter folder loads back onto a fresh base model
    torch.manual_seed(0)  # the same base weights as in _trainer
    loaded = nd.load_nara_model(TinyNet(), tmp_path / "final")
    x = torch.randn(2, 12)
    trainer.model.eval()
    torch.testing.assert_close(loaded(x, noise_level=0.3), trainer.model(x, noise_level=0.3))


def test_full_fine_tuning_trains_the_base_weights(tmp_path):
    trainer = _trainer(tmp_path, adapter="full", max_steps=1, eval_every=0)
    before = trainer.model.head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.model.head.weight, before)


def test_schedule_and_validation_checkpoints(tmp_path):
    result = _trainer(tmp_path, max_steps=6, eval_every=2).train()
    assert result.global_step == 6 and (tmp_path / "best").is_dir() and (tmp_path / "final").is_dir()
    lrs = _log(tmp_path, "train/lr")
    factor = linear_warmup_decay(6, 0.05)
    assert lrs == pytest.approx([1e-2 * factor(i) for i in range(1, 7)])
    assert len(_log(tmp_path, "val/loss")) == 3
    val = _log(tmp_path, "val/loss")
    assert result.best_val_loss == pytest.approx(min(val))


def test_linear_warmup_then_decay():
    f = linear_warmup_decay(100, 0.05)
    assert [f(0), f(4), f(5), f(100)] == pytest.approx([0.2, 1.0, 95 / 95, 0.0])
    assert f(52) == pytest.approx(48 / 95)


def test_resume_after_an_interrupt_replays_the_same_loss_sequence(tmp_path):
    _trainer(tmp_path / "straight", max_steps=8, eval_every=2).train()
    expected = _log(tmp_path / "straight")

    interrupted = _trainer(tmp_path / "resumed", max_steps=8, eval_every=2)
    calls = {"n": 0}
    inner = interrupted.loss_fn

    def dies_after_update_5(model, batch, gen):
        calls["n"] += model.training  # validation calls run in eval mode
        if calls["n"] > 5 * 2:  # two micro-batches per update
            raise KeyboardInterrupt
        return inner(model, batch, gen)

    interrupted.loss_fn = dies_after_update_5
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert json.loads((tmp_path / "resumed" / "state" / "trainer_state.json").read_text())["global_step"] == 4
    _trainer(tmp_path / "resumed", max_steps=8, eval_every=2, resume=True).train()
    # update 5 ran twice, before the interrupt and after the resume from 4, but the log holds it once
    assert _log(tmp_path / "resumed") == expected


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run without --resume"):
        _trainer(tmp_path, max_steps=1, resume=True).train()


def test_a_failing_save_keeps_the_previous_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, eval_every=0)
    trainer.train()
    before = (tmp_path / "final" / "adapter_model.safetensors").read_bytes()

    def disk_full(model, folder):
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    trainer.save_fn = disk_full
    with pytest.raises(OSError, match="No space left"):
        trainer._save_weights("final")
    assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".final")) == []


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 3.0e-4\nepochs: 2\nmixed_precision: bf16\n")
    cfg = load_config(TrainConfig, ["--config", str(path), "--epochs", "5", "--resume", "true"])
    assert (cfg.learning_rate, cfg.epochs, cfg.mixed_precision, cfg.resume) == (3e-4, 5, "bf16", True)
    path.write_text("learning_rate: 1e-4\nlerning_rate: 2\n")
    with pytest.raises(ValueError, match=r"Unknown keys \['lerning_rate'\].*learning_rate"):
        load_config(TrainConfig, ["--config", str(path)])
    with pytest.raises(SystemExit):
        load_config(TrainConfig, ["--lerning_rate", "2"])
    with pytest.raises(ValueError, match="epochs must be a int"):
        load_config(TrainConfig, ["--epochs", "two"])


def test_constant_schedule_callbacks_and_a_given_optimizer(tmp_path):
    seen = []
    torch.manual_seed(0)
    model = attach_adapter(TinyNet(), "nara", r=4, target_modules=["layers.0"], lora_dropout=0.0)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=4, grad_accum=1, max_steps=4, eval_every=0)
    cfg.report_to, cfg.lr_schedule, cfg.warmup_ratio = "none", "constant", 0.75
    trainer = Trainer(
        model,
        cfg,
        regression_data(),
        None,
        stack_collate,
        regression_loss,
        optimizer=sgd,
        callbacks=[lambda t: seen.append(t.global_step)],
    )
    trainer.train()
    assert seen == [1, 2, 3, 4]
    assert _log(tmp_path, "train/lr") == pytest.approx([0.5 * 2 / 3, 0.5, 0.5, 0.5])  # warm-up over 3, then flat
    cfg.lr_schedule = "cosine"
    with pytest.raises(ValueError, match="lr_schedule must be one of linear, constant"):
        Trainer(model, cfg, regression_data(), None, stack_collate, regression_loss)


def test_bare_boolean_flags_mean_true():
    assert load_config(TrainConfig, ["--resume", "--epochs", "3"]).resume is True
    assert load_config(TrainConfig, ["--epochs", "3", "--gradient_checkpointing"]).gradient_checkpointing is True
    assert load_config(TrainConfig, ["--resume", "false"]).resume is False


def test_script_defaults_sit_beneath_the_config_file_and_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\n")
    defaults = {"learning_rate": 5e-3, "epochs": 2, "seed": 9}
    cfg = load_config(TrainConfig, ["--config", str(path), "--seed", "1"], defaults=defaults)
    assert (cfg.learning_rate, cfg.epochs, cfg.seed) == (5e-3, 7, 1)
    assert load_config(TrainConfig, [], defaults={"epochs": "3"}).epochs == 3  # coerced like any value
    assert load_config(TrainConfig, []).learning_rate == TrainConfig.learning_rate
    with pytest.raises(ValueError, match=r"Unknown default fields \['lr'\]"):
        load_config(TrainConfig, [], defaults={"lr": 1.0})
