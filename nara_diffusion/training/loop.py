"""One accelerate training loop for every backend: optimiser, schedule, validation, checkpoints, resume, logs.

The backend supplies a dataset, a collate function and ``loss_fn(model, batch, generator) -> scalar``; the
loop owns everything else. Randomness inside ``loss_fn`` (masking, timesteps) comes from the generator it
is handed, seeded from (seed, update, micro-step, process), and the global torch RNG (dropout) is seeded from
the same four numbers right before every forward, so nothing depends on RNG history: a resumed run replays
the same noise and the same dropout masks, bit for bit.

Checkpoints never use pickle. ``<output_dir>/state/`` holds the trainable tensors (``trainable.safetensors``),
the optimizer's state tensors (``optimizer.safetensors``, keys ``state.<param index>.<name>``) with its parameter
groups and scalar state (``optimizer.json``), and the update counters, LR schedule position and loss-scaler
settings (``trainer_state.json``). Every folder is written by `write_atomically` and recovered by `recover`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
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

from ..core import folders
from ..core.folders import recover, write_atomically
from .config import TrainConfig, config_to_dict

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]
STATE_DIR, BEST_DIR, FINAL_DIR = "state", "best", "final"
TRAINABLE_FILE, TRAINER_STATE_FILE, LOG_FILE = "trainable.safetensors", "trainer_state.json", "log.jsonl"
OPTIMIZER_FILE, OPTIMIZER_META_FILE = "optimizer.safetensors", "optimizer.json"
STATE_FORMAT, STATE_VERSION = "nara_diffusion.trainer_state", 1
#: Optimizer state entries shaped like their parameter (AdamW, Adam, SGD), checked on load.
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, of another format, or not matching this run."""


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


def _seed_forward(seed: int, step: int, micro: int, rank: int) -> None:
    """Seed the global torch RNGs (CPU and accelerators: dropout) from (seed, update, micro-step, process) alone.

    A hash, so no two micro-steps share a seed and the stream differs from `_noise_generator`'s.
    """
    digest = hashlib.blake2b(f"forward:{seed}:{step}:{micro}:{rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") >> 1)


def has_started(output_dir: Path | str) -> bool:
    """Whether ``output_dir`` holds a run that a `Trainer` with ``resume=True`` continues (a checkpoint, complete or
    recoverable, or the log of a run stopped before its first checkpoint)."""
    output_dir = Path(output_dir)
    _, new, old = folders.siblings(output_dir / STATE_DIR)
    return (output_dir / LOG_FILE).is_file() or any(p.is_dir() for p in (output_dir / STATE_DIR, new, old))


def default_save(model: nn.Module, folder: Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Adapters: the peft adapter folder; full fine-tuning: ``save_pretrained`` of the whole model, or its
    state dict as ``model.safetensors`` for a plain torch module. ``state_dict``: the full (gathered) state of a
    model whose parameters are sharded (FSDP, ZeRO-3), saved instead of the model's own shards."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
    else:
        state = model.state_dict() if state_dict is None else state_dict
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def parameters_sharded(accelerator: Accelerator) -> bool:
    """True when each process holds only a shard of the parameters (FSDP, DeepSpeed ZeRO-3): saving then gathers the
    full state first, on every process. DDP and ZeRO-1/2 keep a full replica on every process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return int(accelerator.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3
    return False


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a JSON file ({err}).") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for foreign or truncated files
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}).") from err


def _write_json(path: Path, data: Any) -> None:
    try:
        text = json.dumps(data, indent=1)
    except TypeError as err:
        raise TypeError(f"{path.name}: the state holds a value JSON cannot store ({err}); it is not pickled.") from err
    path.write_text(text + "\n", encoding="utf-8")


def optimizer_state_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<index>.<name>``) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from_files(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path
) -> dict[str, Any]:
    """The inverse of `optimizer_state_to_files`, checked against ``optimizer`` (groups, sizes, shapes).

    Raises:
        CheckpointError: naming ``path`` (the tensor file) or its JSON sibling.
    """
    meta_path = path.with_name(OPTIMIZER_META_FILE)
    current = optimizer.state_dict()["param_groups"]
    groups = meta.get("param_groups")
    sizes = [len(g["params"]) for g in current]
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != sizes:
        saved = [len(g.get("params", ())) for g in groups] if isinstance(groups, list) else groups
        raise CheckpointError(
            f"{meta_path}: the optimizer's parameter groups had sizes {saved}, this run's have {sizes}; "
            "was the run (adapter, targets, rank) changed?"
        )
    loaded_groups = []
    for saved, now in zip(groups, current, strict=True):
        group = {k: tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()}
        group["params"] = now["params"]
        loaded_groups.append(group)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (this optimizer has {len(params)} parameters).")
        index, name = int(parts[1]), parts[2]
        if name in _PARAM_SHAPED and tensor.shape != params[index].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, its parameter {tuple(params[index].shape)}; "
                "was the run changed?"
            )
        state.setdefault(index, {})[name] = tensor
    for index, entries in (meta.get("scalars") or {}).items():
        if not str(index).isdigit() or int(index) >= len(params) or not isinstance(entries, dict):
            raise CheckpointError(f"{meta_path}: unexpected optimizer state entry {index!r}.")
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": loaded_groups}


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
        config.validate()  # again: fields may have been changed after construction
        if len(train_dataset) == 0:
            raise ValueError("The training set is empty; check the dataset and max_length.")
        if config.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_schedule!r}.")
        self.config, self.loss_fn, self.save_fn = config, loss_fn, save_fn
        self.callbacks = list(callbacks)
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or build_accelerator(config)
        self.sharded = parameters_sharded(self.accelerator)
        logger.info(
            "engine: %s on %d process(es)%s",
            self.accelerator.distributed_type.value,
            self.accelerator.num_processes,
            " (parameters sharded)" if self.sharded else "",
        )
        if self.sharded and "state_dict" not in inspect.signature(save_fn).parameters:
            raise ValueError(
                "Under FSDP / ZeRO-3 the weights are gathered before saving: save_fn must accept a state_dict= "
                "keyword (the full state, to pass to save_pretrained), as default_save does."
            )
        if self.sharded and config.resume:
            raise ValueError(
                "--resume is not supported under FSDP / ZeRO-3 (state/ holds unsharded tensors only); resume with "
                "DDP or ZeRO-1/2, or start the run again."
            )
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
            self.optimizer,
            LR_SCHEDULES[config.lr_schedule](self.total_updates, config.warmup_fraction(self.total_updates)),
        )
        self.global_step, self.batches_done, self.best_val_loss = 0, 0, None
        self._state_step: Optional[int] = None  # the update whose state is in state/

    # -- checkpoint state: trainable tensors, optimizer, schedule, counters; never pickles --------------------
    def _write_state(self, folder: Path) -> None:
        """Write the state files into ``folder`` (main process; DDP replicas hold the same optimizer state)."""
        acc = self.accelerator
        save_file(_trainable_state(acc.unwrap_model(self.model)), str(folder / TRAINABLE_FILE))
        folders._kill_point("state_writing", self.output_dir / STATE_DIR)
        tensors, meta = optimizer_state_to_files(self.optimizer.state_dict())
        save_file(tensors, str(folder / OPTIMIZER_FILE))
        _write_json(folder / OPTIMIZER_META_FILE, meta)
        folders._kill_point("state_writing", self.output_dir / STATE_DIR)
        sched = self.scheduler
        trainer_state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "global_step": self.global_step,
            "batches_done": self.batches_done,
            "best_val_loss": self.best_val_loss,
            "accelerator_step": acc.step,
            "scheduler": {
                "last_epoch": sched.last_epoch,
                "step_count": sched._step_count,
                "base_lrs": list(sched.base_lrs),
                "last_lr": list(sched._last_lr),
            },
            "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        }
        _write_json(folder / TRAINER_STATE_FILE, trainer_state)

    def _load_state(self, folder: Path) -> None:
        """Read a state folder written by `_write_state`, checking every file against this run first."""
        meta_path = folder / TRAINER_STATE_FILE
        meta = _read_json(meta_path)
        if meta.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"{meta_path} is not a {STATE_FORMAT} file: the state was written by an older nara_diffusion "
                "(with accelerate's pickled files, which are never loaded: unpickling can run code). Start the run "
                "again without --resume; the adapters in best/ and final/ are unaffected."
            )
        if meta.get("version") != STATE_VERSION:
            raise CheckpointError(f"{meta_path} has version {meta.get('version')}; this library reads {STATE_VERSION}.")
        missing = {"global_step", "batches_done", "best_val_loss", "accelerator_step", "scheduler"} - set(meta)
        if missing:
            raise CheckpointError(f"{meta_path} lacks {sorted(missing)}.")
        sched = meta["scheduler"]
        if not isinstance(sched, dict) or len(sched.get("base_lrs", ())) != len(self.optimizer.param_groups):
            raise CheckpointError(f"{meta_path}: the LR schedule does not match this run's parameter groups.")

        trainable_path = folder / TRAINABLE_FILE
        state = _read_tensors(trainable_path)
        params = {n: p for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad}
        unknown, absent = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        if unknown or absent:
            raise CheckpointError(
                f"{trainable_path} does not match this run's trainable parameters (unknown: {unknown[:5]}, "
                f"missing: {absent[:5]}); was the run (adapter, targets) changed?"
            )
        for name, tensor in state.items():
            if tensor.shape != params[name].shape:
                raise CheckpointError(
                    f"{trainable_path}: {name} has shape {tuple(tensor.shape)}, this run's "
                    f"{tuple(params[name].shape)}; was the rank changed?"
                )
        optimizer_path = folder / OPTIMIZER_FILE
        optimizer_state = optimizer_state_from_files(
            _read_tensors(optimizer_path), _read_json(folder / OPTIMIZER_META_FILE), self.optimizer, optimizer_path
        )

        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.last_epoch = int(sched["last_epoch"])
        self.scheduler._step_count = int(sched["step_count"])
        self.scheduler.base_lrs = [float(v) for v in sched["base_lrs"]]
        self.scheduler._last_lr = [float(v) for v in sched["last_lr"]]
        if meta.get("grad_scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(meta["grad_scaler"])
        self.accelerator.step = int(meta["accelerator_step"])
        self.global_step, self.batches_done = int(meta["global_step"]), int(meta["batches_done"])
        self.best_val_loss = meta["best_val_loss"]
        self._state_step = self.global_step

    def _save_state(self) -> None:
        if self.sharded:  # optimizer moments are sharded too; state/ (for --resume) is written under DDP / ZeRO-1/2
            self._state_step = self.global_step
            return
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_atomically(self.output_dir / STATE_DIR, self._write_state)
        self.accelerator.wait_for_everyone()
        self._state_step = self.global_step

    def _resume(self) -> bool:
        """Recover the output folder after a kill and load ``state/``. Returns False (start afresh) when the run
        was interrupted before its first checkpoint; raises when there is no sign of an earlier run at all."""
        acc = self.accelerator
        if acc.is_main_process:
            for name in (STATE_DIR, BEST_DIR, FINAL_DIR):
                recover(self.output_dir / name)
        acc.wait_for_everyone()
        state_dir = self.output_dir / STATE_DIR
        if not state_dir.is_dir():
            if (self.output_dir / LOG_FILE).is_file():
                logger.warning(
                    "--resume: %s holds no checkpoint yet (the run stopped before its first one); "
                    "starting from update 0.",
                    self.output_dir,
                )
                return False
            raise FileNotFoundError(f"--resume: no checkpoint state in {state_dir}; run without --resume to start.")
        self._load_state(state_dir)
        logger.info("Resumed from %s at update %d", state_dir, self.global_step)
        return True

    def _truncate_log(self) -> None:
        """Keep the log rows of the updates up to the resumed one (what an uninterrupted run had logged by then)."""
        path = self.output_dir / LOG_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if isinstance(row, dict) and row.get("step", 0) <= self.global_step and "replica_fingerprints" not in row:
                kept.append(line + "\n")
        tmp = path.with_name(f".{LOG_FILE}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)

    def _save_weights(self, name: str) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.output_dir / name
        # sharded engines: gather the full state on every process (a collective), then the main process writes it once
        extra = {"state_dict": acc.get_state_dict(self.model)} if self.sharded else {}
        if acc.is_main_process:
            write_atomically(folder, lambda tmp: self.save_fn(acc.unwrap_model(self.model), tmp, **extra))
        acc.wait_for_everyone()
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
        """Mean validation loss at random noise levels drawn from a fixed seed (the same at every call; the global
        torch RNG is reseeded before every batch, as in training)."""
        if self.val_loader is None:
            return None
        self.model.eval()
        total, count = torch.zeros((), device=self.accelerator.device), 0
        for i, batch in enumerate(self.val_loader):
            gen = _noise_generator(self.config.seed, -1, i, self.accelerator.process_index, self.accelerator.device)
            _seed_forward(self.config.seed, -1, i, self.accelerator.process_index)
            total += self.loss_fn(self.model, batch, gen).detach().float()
            count += 1
        self.model.train()
        mean = self.accelerator.gather(total.reshape(1) / max(count, 1)).mean()
        return float(mean)

    def train(self) -> TrainResult:
        """Run until ``total_updates``; returns where the best and final weights were written."""
        cfg, acc = self.config, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resumed = cfg.resume and self._resume()
        if acc.is_main_process:
            if resumed:
                self._truncate_log()
            elif (self.output_dir / LOG_FILE).exists():
                (self.output_dir / LOG_FILE).unlink()
        if acc.log_with:
            acc.init_trackers("nara_diffusion", config=config_to_dict(cfg))
        self.model.train()
        # An explicit `disable` overrides tqdm's TQDM_DISABLE, so honour it here (benchmark workers set it).
        quiet = not acc.is_local_main_process or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
        bar = tqdm(total=self.total_updates, initial=self.global_step, disable=quiet)
        epoch = self.batches_done // len(self.loader)
        running: list[torch.Tensor] = []
        while self.global_step < self.total_updates:
            self.sampler.use_epoch(epoch)
            skip = self.batches_done - epoch * len(self.loader)
            batches = acc.skip_first_batches(self.loader, skip) if skip else self.loader
            for micro, batch in enumerate(batches, start=skip):
                with acc.accumulate(self.model):
                    gen = _noise_generator(cfg.seed, self.global_step, micro, acc.process_index, acc.device)
                    _seed_forward(cfg.seed, self.global_step, micro, acc.process_index)
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
                for callback in self.callbacks:  # before the checkpoint: a resume from it has them all
                    callback(self)
                if cfg.eval_every and self.global_step % cfg.eval_every == 0:
                    self._checkpoint()
                if self.global_step >= self.total_updates:
                    break
            else:
                epoch += 1
                continue
            break
        bar.close()
        if self._state_step != self.global_step:  # not checkpointed at the last update yet
            self._checkpoint()
        final_dir = self._save_weights(FINAL_DIR)
        self._check_replicas()
        # accelerate's end_training without its destroy_process_group: the caller may still need the group (a test
        # set scored after training, the next noise bin, its own barriers), and destroying it while this Trainer's
        # DDP wrapper is alive made the wrapper's teardown hang at random under CPU (gloo) data parallelism.
        for tracker in acc.trackers:
            tracker.finish()
        best = self.output_dir / BEST_DIR
        return TrainResult(self.global_step, self.best_val_loss, final_dir, best if best.exists() else None)

    def _check_replicas(self) -> None:
        """Log a fingerprint of the trained weights from every process; they must agree under data parallelism.
        Sharded engines hold one copy of each parameter (no replicas to compare): nothing is logged."""
        if self.sharded:
            return
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
