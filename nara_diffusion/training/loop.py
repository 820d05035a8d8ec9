"""One accelerate training loop for every backend: optimiser, schedule, validation, checkpoints, resume, logs.

The backend supplies a dataset, a collate function and ``loss_fn(model, batch, generator) -> scalar``; the
loop owns everything else. Randomness inside ``loss_fn`` (masking, timesteps) comes from the generator it
is handed, seeded from (seed, update, micro-step, process), so a resumed run replays the same noise.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import write_atomically
from .config import TrainConfig, config_to_dict

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]
STATE_DIR, BEST_DIR, FINAL_DIR = "state", "best", "final"
TRAINABLE_FILE, TRAINER_STATE_FILE, LOG_FILE = "trainable.safetensors", "trainer_state.json", "log.jsonl"


class EpochShuffleSampler(Sampler[int]):
    """A permutation of the dataset that depends only on (seed, epoch): reproducible across resumes.

    The epoch is set with `use_epoch`, deliberately not ``set_epoch``: accelerate calls ``set_epoch`` with its
    own per-loader iteration count, which restarts at 0 in the loader that skips batches after a resume.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self) -> int:
        return self.length


@dataclass
class TrainResult:
    """What a run produced: the number of optimizer updates, the best validation loss, where things are, and any
    further figures the run measured (e.g. ``test_accuracy_before`` / ``test_accuracy_after``)."""

    global_step: int
    best_val_loss: Optional[float]
    final_dir: Path
    best_dir: Optional[Path]
    metrics: dict[str, float] = field(default_factory=dict)


def linear_warmup_decay(total: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_ratio·total`` updates, then linear decay to 0 at ``total``."""
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def constant_after_warmup(total: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_ratio·total`` updates, then constant (diffusers' ``constant``)."""
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else 1.0

    return factor


LR_SCHEDULES = {"linear": linear_warmup_decay, "constant": constant_after_warmup}


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The `Accelerator` a `Trainer` builds from ``config`` (accumulation, mixed precision, trackers, project dir).

    Build it yourself when work must run on the right device before the Trainer exists (e.g. generating
    DreamBooth class images), and hand it to the Trainer.
    """
    return Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=config.mixed_precision,
        log_with=_tracker(config.report_to),
        project_dir=str(config.output_dir),
    )


def _noise_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 8191 + rank)
    return gen


def default_save(model: nn.Module, folder: Path) -> None:
    """Adapters: the peft adapter folder; full fine-tuning: ``save_pretrained`` of the whole model, or its
    state dict as ``model.safetensors`` for a plain torch module."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """Runs `TrainConfig` on a model; see the module docstring for the division of labour.

    Args:
        model: The model with its trainable parameters marked (`attach_adapter`).
        config: Optimisation and checkpointing settings.
        train_dataset, val_dataset: Map-style datasets; ``val_dataset`` may be None or empty.
        collate_fn: Builds a batch from a list of examples.
        loss_fn: ``loss_fn(model, batch, generator)`` → scalar loss.
        save_fn: Writes the trained weights to a folder (default: ``model.save_pretrained``).
        accelerator: An `Accelerator` to use (default: `build_accelerator(config)`).
        optimizer: An optimizer over the model's trainable parameters (default: AdamW with the config's settings),
            e.g. bitsandbytes' 8-bit AdamW or one with parameter groups; the schedule scales every group's lr.
        callbacks: Called as ``callback(trainer)`` after every optimizer update (``trainer.global_step`` is the
            number of updates done), on every process; e.g. periodic validation images.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_dataset: Dataset,
        val_dataset: Optional[Dataset],
        collate_fn: Callable[[list], Any],
        loss_fn: LossFn,
        save_fn: Callable[[nn.Module, Path], None] = default_save,
        accelerator: Optional[Accelerator] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        callbacks: Sequence[Callable[[Trainer], None]] = (),
    ) -> None:
        if len(train_dataset) == 0:
            raise ValueError("The training set is empty; check the dataset and max_length.")
        if config.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_schedule!r}.")
        self.config, self.loss_fn, self.save_fn = config, loss_fn, save_fn
        self.callbacks = list(callbacks)
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or build_accelerator(config)
        set_seed(config.seed)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no trainable parameters; attach an adapter or choose full fine-tuning.")
        if optimizer is None:
            optimizer = torch.optim.AdamW(
                params,
                lr=config.learning_rate,
                betas=(config.adam_beta1, config.adam_beta2),
                eps=config.adam_eps,
                weight_decay=config.weight_decay,
            )
        self.sampler = EpochShuffleSampler(len(train_dataset), config.seed)
        loader = DataLoader(
            train_dataset,
            batch_size=config.batch_size,
            sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=config.num_workers,
        )
        self.val_loader = None
        if val_dataset is not None and len(val_dataset) > 0:
            self.val_loader = DataLoader(val_dataset, batch_size=config.batch_size, collate_fn=collate_fn)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        if self.val_loader is not None:
            self.val_loader = self.accelerator.prepare(self.val_loader)
        self.updates_per_epoch = math.ceil(len(self.loader) / config.grad_accum)
        self.total_updates = config.max_steps or config.epochs * self.updates_per_epoch
        # Stepped by hand once per update; accelerate's wrapper would step once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LR_SCHEDULES[config.lr_schedule](self.total_updates, config.warmup_ratio)
        )
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.accelerator.register_save_state_pre_hook(self._save_trainable)
        self.accelerator.register_load_state_pre_hook(self._load_trainable)
        self.global_step, self.batches_done, self.best_val_loss = 0, 0, None

    # -- checkpoint state: only the trainable tensors, never the frozen base model --------------------------
    def _save_trainable(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(self.model)
            save_file(_trainable_state(unwrapped), str(Path(output_dir) / TRAINABLE_FILE))
        weights.clear()

    def _load_trainable(self, models: list, input_dir: str) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        state = load_file(str(Path(input_dir) / TRAINABLE_FILE))
        params = dict(unwrapped.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"The checkpoint holds tensors this model lacks: {unknown[:5]}; was the run changed?")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        models.clear()

    def _save_state(self) -> None:
        state_dir = self.output_dir / STATE_DIR
        tmp = self.output_dir / f".{STATE_DIR}.tmp"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()  # every process has written its part before the folder moves
        if self.accelerator.is_main_process:
            meta = {"global_step": self.global_step, "batches_done": self.batches_done}
            meta["best_val_loss"] = self.best_val_loss
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(meta))
            old = self.output_dir / f".{STATE_DIR}.old"
            if state_dir.exists():
                state_dir.rename(old)
            tmp.rename(state_dir)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        state_dir = self.output_dir / STATE_DIR
        if not (state_dir / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint state in {state_dir}; run without --resume to start.")
        self.accelerator.load_state(str(state_dir))
        meta = json.loads((state_dir / TRAINER_STATE_FILE).read_text())
        self.global_step, self.batches_done = meta["global_step"], meta["batches_done"]
        self.best_val_loss = meta["best_val_loss"]
        logger.info("Resumed from %s at update %d", state_dir, self.global_step)

    def _save_weights(self, name: str) -> Path:
        self.accelerator.wait_for_everyone()
        folder = self.output_dir / name
        if self.accelerator.is_main_process:
            write_atomically(folder, lambda tmp: self.save_fn(self.accelerator.unwrap_model(self.model), tmp))
        self.accelerator.wait_for_everyone()
        return folder

    def _log(self, metrics: dict[str, Any], trackers: bool = True) -> None:
        if trackers:
            self.accelerator.log(metrics, step=self.global_step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / LOG_FILE, "a") as fh:
                fh.write(json.dumps({"step": self.global_step, **metrics}) + "\n")

    # -- the loop ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation loss at random noise levels drawn from a fixed seed (the same at every call)."""
        if self.val_loader is None:
            return None
        self.model.eval()
        total, count = torch.zeros((), device=self.accelerator.device), 0
        for i, batch in enumerate(self.val_loader):
            gen = _noise_generator(self.config.seed, -1, i, self.accelerator.process_index, self.accelerator.device)
            total += self.loss_fn(self.model, batch, gen).detach().float()
            count += 1
        self.model.train()
        mean = self.accelerator.gather(total.reshape(1) / max(count, 1)).mean()
        return float(mean)

    def train(self) -> TrainResult:
        """Run until ``total_updates``; returns where the best and final weights were written."""
        cfg, acc = self.config, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self._resume()
        elif acc.is_main_process and (self.output_dir / LOG_FILE).exists():
            (self.output_dir / LOG_FILE).unlink()
        if acc.log_with:
            acc.init_trackers("nara_diffusion", config=config_to_dict(cfg))
        self.model.train()
        bar = tqdm(total=self.total_updates, initial=self.global_step, disable=not acc.is_local_main_process)
        epoch = self.batches_done // len(self.loader)
        running: list[torch.Tensor] = []
        while self.global_step < self.total_updates:
            self.sampler.use_epoch(epoch)
            skip = self.batches_done - epoch * len(self.loader)
            batches = acc.skip_first_batches(self.loader, skip) if skip else self.loader
            for micro, batch in enumerate(batches, start=skip):
                with acc.accumulate(self.model):
                    gen = _noise_generator(cfg.seed, self.global_step, micro, acc.process_index, acc.device)
                    loss = self.loss_fn(self.model, batch, gen)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                running.append(loss.detach().float())
                self.batches_done += 1
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.global_step += 1
                train_loss = float(acc.gather(torch.stack(running).mean().reshape(1)).mean())
                running = []
                self._log({"train/loss": train_loss, "train/lr": self.scheduler.get_last_lr()[0]})
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}")
                if cfg.eval_every and self.global_step % cfg.eval_every == 0:
                    self._checkpoint()
                for callback in self.callbacks:
                    callback(self)
                if self.global_step >= self.total_updates:
                    break
            else:
                epoch += 1
                continue
            break
        bar.close()
        if not cfg.eval_every or self.global_step % cfg.eval_every:
            self._checkpoint()
        final_dir = self._save_weights(FINAL_DIR)
        self._check_replicas()
        acc.end_training()
        best = self.output_dir / BEST_DIR
        return TrainResult(self.global_step, self.best_val_loss, final_dir, best if best.exists() else None)

    def _check_replicas(self) -> None:
        """Log a fingerprint of the trained weights from every process; they must agree under data parallelism."""
        trained = [
            p.detach().double() for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad
        ]
        fingerprint = torch.stack([sum(p.sum() for p in trained), sum(p.square().sum() for p in trained)])
        gathered = self.accelerator.gather(fingerprint.to(self.accelerator.device).reshape(1, 2)).tolist()
        self._log({"replica_fingerprints": gathered}, trackers=False)
        if any(row != gathered[0] for row in gathered):
            logger.warning("The processes ended with different weights: %s", gathered)

    def _checkpoint(self) -> None:
        val_loss = self.evaluate()
        if val_loss is not None:
            self._log({"val/loss": val_loss})
            if self.best_val_loss is None or val_loss < self.best_val_loss:
                self.best_val_loss = val_loss
                self._save_weights(BEST_DIR)
        self._save_state()


def _tracker(report_to: str) -> Optional[str]:
    if report_to in ("none", "", None):
        return None
    if report_to != "tensorboard":
        raise ValueError(f"report_to must be 'tensorboard' or 'none', got {report_to!r}.")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        logger.warning("TensorBoard is not installed (pip install tensorboard); logging to log.jsonl only.")
        return None
    return "tensorboard"
