"""Training configuration: one dataclass, filled from a YAML file and ``--field value`` overrides."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml

T = TypeVar("T")


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


__all__ = ["TrainConfig", "config_to_dict", "load_config"]
