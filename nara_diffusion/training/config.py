"""Training configuration: one dataclass, filled from a YAML file and ``--field value`` overrides."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml

T = TypeVar("T")

LR_SCHEDULE_NAMES = ("linear", "constant")
MIXED_PRECISION_MODES = ("no", "fp16", "bf16", "fp8")
REPORT_TO = ("tensorboard", "none")


def check_int(name: str, value: Any, minimum: int = 0, *, optional: bool = False, hint: str = "") -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum`` (or None when ``optional``), naming ``--name``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        unset = " (or none)" if optional and not hint else ""
        raise ValueError(f"--{name} must be an integer >= {minimum}{unset}{hint}, got {value!r}.")


def check_float(
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    hint: str = "",
) -> None:
    """Raise ValueError unless ``value`` is a finite number in the interval (each bound open or closed), naming the
    flag ``--name``."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        unset = " (or none)" if optional and not hint else ""
        raise ValueError(f"--{name} must be a finite number in {interval}{unset}{hint}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}.")


def check_model_path(name: str, flag: str = "model", example: str = "GSAI-ML/LLaDA-8B-Instruct") -> str:
    """``name`` as ``from_pretrained`` should get it: an existing folder (``~`` expanded) or a Hub id.

    A name that is meant as a local path (it starts with ``.``, ``/`` or ``~``, or is no valid Hub id, e.g. has two
    slashes) but is no folder raises FileNotFoundError here, instead of the Hub's "Repo id must be in the form" error
    later. A valid Hub id that is no local folder is returned unchanged (the Hub decides).
    """
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"--{flag} {name} is a file; give the folder that holds the model (or a Hub id).")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    local = name.startswith((".", "/", "~", os.sep))
    try:
        validate_repo_id(name)
    except HFValidationError:
        local = True
    if local:
        raise FileNotFoundError(
            f"--{flag} {name}: no such folder ({path.resolve()}); give an existing folder (or a Hub id like {example})."
        )
    return name


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging settings shared by every training script.

    Defaults are the NaRA authors' recipe (spec nara.md §5): AdamW (0.9, 0.95), weight decay 0.05, eps 1e-8,
    grad-norm clip 1.0, 5% linear warm-up then linear decay to 0, validation every 64 updates.
    """

    output_dir: str = "outputs/run"
    seed: int = 1234
    learning_rate: float = 1e-4
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer updates; overrides epochs when set
    batch_size: int = 1  # per device, per micro-step
    grad_accum: int = 32
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.05
    lr_schedule: str = "linear"  # after the warm-up: "linear" decay to 0, or "constant"
    eval_every: int = 64  # updates between validation losses and checkpoints; 0 disables
    mixed_precision: Optional[str] = None  # "no" | "fp16" | "bf16"; None: what `accelerate config` says
    gradient_checkpointing: bool = False
    report_to: str = "tensorboard"  # "tensorboard" | "none"
    resume: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, naming the flag and the fix, for a setting no run can use (called on construction and
        again by the runners and the `Trainer`, before anything loads, for configs changed after construction)."""
        check_int("seed", self.seed, 0)
        if self.seed >= 2**32:
            raise ValueError(f"--seed must be < 2**32 (numpy's limit), got {self.seed}.")
        check_float("learning_rate", self.learning_rate, 0.0, low_open=True)
        check_int("epochs", self.epochs, 1)
        check_int("max_steps", self.max_steps, 1, optional=True, hint=", or leave it unset to train for --epochs")
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum", self.grad_accum, 1)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("adam_beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        check_float("adam_beta2", self.adam_beta2, 0.0, 1.0, high_open=True)
        check_float("adam_eps", self.adam_eps, 0.0)
        check_float("max_grad_norm", self.max_grad_norm, 0.0, hint=" (0 turns clipping off)")
        check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULE_NAMES)
        check_int("eval_every", self.eval_every, 0, hint=" (0 turns validation and checkpoints off)")
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_MODES)
        check_choice("report_to", self.report_to, REPORT_TO)
        check_int("num_workers", self.num_workers, 0)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        if len(args) == 1:
            return _coerce(value, args[0], name)
        return value
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        inner = args[0] if args else str
        items = [_coerce(v, inner, name) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a {annotation.__name__}, got {value!r}.") from err
    return value


def load_config(
    cls: type[T],
    argv: Optional[Sequence[str]] = None,
    description: str = "",
    defaults: Optional[Mapping[str, Any]] = None,
) -> T:
    """Build a ``cls`` dataclass from ``--config file.yaml`` and ``--field value`` overrides (the latter win).

    ``defaults`` (field: value) replace the dataclass defaults, beneath the YAML file and the command line; a script
    uses them for an embedded default run. Unknown keys, in the YAML file, the command line or ``defaults``, are
    rejected with the list of valid ones.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields below")
    for name in fields:
        # A bare boolean flag (``--with_prior_preservation``) means true, as with argparse's store_true.
        flag = {"nargs": "?", "const": "true"} if hints[name] is bool else {}
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=name.upper(), **flag)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown arguments {unknown}; valid fields: {', '.join(sorted(fields))}")

    values: dict[str, Any] = dict(defaults or {})
    bad = sorted(set(values) - set(fields))
    if bad:
        raise ValueError(f"Unknown default fields {bad}; valid fields: {', '.join(sorted(fields))}.")
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"Config file {args.config} does not exist.")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config} must hold a mapping of field: value.")
        bad = sorted(set(loaded) - set(fields))
        if bad:
            raise ValueError(f"Unknown keys {bad} in {args.config}; valid keys: {', '.join(sorted(fields))}.")
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    return cls(**{k: _coerce(v, hints[k], k) for k, v in values.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    """Flat, tracker-friendly view of a config dataclass (sequences joined, None as "none")."""
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[key] = "none" if value is None else value
    return out


__all__ = [
    "TrainConfig",
    "check_choice",
    "check_float",
    "check_int",
    "check_model_path",
    "config_to_dict",
    "load_config",
]
