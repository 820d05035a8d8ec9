"""Training configuration: dataclasses whose fields carry their own command-line help, filled from a YAML file and
``--field value`` overrides by `load_config` (transformers' `HfArgumentParser` builds the parser from the fields)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml

T = TypeVar("T")

LR_SCHEDULE_NAMES = ("linear", "constant")
MIXED_PRECISION_MODES = ("no", "fp16", "bf16", "fp8")
REPORT_TO = ("tensorboard", "none")
#: The value of ``--resume_from_checkpoint`` that resumes from ``<output_dir>/state`` (besides true and that path).
RESUME_LATEST = "latest"


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


def describe(help: str, choices: Optional[Sequence[Any]] = None, aliases: Sequence[str] = ()) -> dict[str, Any]:
    """Field metadata for the command line: ``--help`` shows ``help``, the default and ``choices``; ``aliases`` are
    other accepted names (e.g. diffusers' spelling), on the command line and in YAML files. Use it as
    ``field(default_factory=..., metadata=describe(...))`` where `option` cannot serve (mutable defaults).

    The choices are shown, not enforced by the parser: ``validate()`` checks them and names the fix.
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if aliases:
        metadata["aliases"] = [f"--{name}" for name in aliases]
    return metadata


def option(default: Any, *, help: str, choices: Optional[Sequence[Any]] = None, aliases: Sequence[str] = ()) -> Any:
    """A config field with an immutable ``default`` that documents itself (see `describe`)."""
    return field(default=default, metadata=describe(help, choices, aliases))


def retune(cls: type, name: str, default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """Field ``name`` of the base config ``cls`` with another default, keeping its help, choices and aliases."""
    base = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field(default=default, default_factory=default_factory, metadata=base.metadata)


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging settings shared by every training script.

    Defaults are the NaRA authors' recipe (spec nara.md §5): AdamW (0.9, 0.95), weight decay 0.05, eps 1e-8,
    grad-norm clip 1.0, 5% linear warm-up then linear decay to 0, validation every 64 updates. Fields that diffusers'
    training scripts also have accept diffusers' names as aliases (``--max_train_steps`` for ``--max_steps``, ...).
    """

    output_dir: str = option(
        "outputs/run", help="Folder of the run: best/ and final/ adapters, state/ for resuming, logs."
    )
    seed: int = option(1234, help="Seed of everything random (adapter init, data order, noise, dropout).")
    learning_rate: float = option(1e-4, help="Peak learning rate of the adapter (AdamW).")
    epochs: int = option(1, help="Passes over the training set (when --max_steps is unset).")
    max_steps: Optional[int] = option(
        None,
        help="Optimizer updates in all; overrides --epochs when set (none: train for --epochs).",
        aliases=["max_train_steps"],
    )
    batch_size: int = option(1, help="Examples per device per micro-step.", aliases=["train_batch_size"])
    grad_accum: int = option(
        32, help="Micro-steps accumulated per optimizer update.", aliases=["gradient_accumulation_steps"]
    )
    weight_decay: float = option(0.05, help="AdamW weight decay.", aliases=["adam_weight_decay"])
    adam_beta1: float = option(0.9, help="AdamW beta1.")
    adam_beta2: float = option(0.95, help="AdamW beta2.")
    adam_eps: float = option(1e-8, help="AdamW epsilon.", aliases=["adam_epsilon"])
    max_grad_norm: float = option(1.0, help="Gradient-norm clipping threshold (0 turns clipping off).")
    warmup_ratio: float = option(0.05, help="Share of the updates spent warming the learning rate up linearly.")
    lr_warmup_steps: Optional[int] = option(
        None, help="Warm-up length in updates (diffusers' flag); overrides --warmup_ratio when set."
    )
    lr_schedule: str = option(
        "linear",
        help="Learning rate after the warm-up: linear decay to 0, or constant.",
        choices=LR_SCHEDULE_NAMES,
        aliases=["lr_scheduler"],
    )
    eval_every: int = option(
        64,
        help="Updates between checkpoints (and validation losses where there is a validation set); 0: none.",
        aliases=["checkpointing_steps"],
    )
    checkpoints_total_limit: Optional[int] = option(
        None,
        help="Resumable states to keep (diffusers' flag). The trainer keeps exactly one, <output_dir>/state, "
        "replaced at every checkpoint, besides best/ and final/; so any limit >= 1 holds already.",
    )
    mixed_precision: Optional[str] = option(
        None, help="Mixed precision (none: what `accelerate config` says).", choices=(*MIXED_PRECISION_MODES, None)
    )
    gradient_checkpointing: bool = option(False, help="Recompute activations in the backward pass to save memory.")
    report_to: str = option(
        "tensorboard", help="Tracker for losses and images (log.jsonl is always written).", choices=REPORT_TO
    )
    resume: bool = option(
        False,
        help="Resume from <output_dir>/state: true or latest; false starts afresh; a PATH must be that state "
        "folder (or the run folder that holds it), the one state the trainer keeps.",
        aliases=["resume_from_checkpoint"],
    )
    num_workers: int = option(0, help="DataLoader worker processes.", aliases=["dataloader_num_workers"])
    push_to_hub: bool = option(False, help="After training, upload final/ to the Hub repository --hub_model_id.")
    hub_model_id: Optional[str] = option(
        None, help="Hub repository (owner/name) for --push_to_hub (none: the output folder's name, under your user)."
    )

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
        check_int("lr_warmup_steps", self.lr_warmup_steps, 0, optional=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULE_NAMES)
        check_int("eval_every", self.eval_every, 0, hint=" (0 turns validation and checkpoints off)")
        check_int("checkpoints_total_limit", self.checkpoints_total_limit, 1, optional=True)
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_MODES)
        check_choice("report_to", self.report_to, REPORT_TO)
        if not isinstance(self.resume, bool):
            raise ValueError(f"--resume must be true or false, got {self.resume!r}.")
        check_int("num_workers", self.num_workers, 0)
        if self.hub_model_id is not None and not self.push_to_hub:
            raise ValueError("--hub_model_id names where --push_to_hub uploads; pass --push_to_hub too.")

    def warmup_fraction(self, total_updates: int) -> float:
        """The warm-up as a share of ``total_updates``: ``lr_warmup_steps / total`` when set, else ``warmup_ratio``."""
        if self.lr_warmup_steps is None:
            return self.warmup_ratio
        return min(1.0, self.lr_warmup_steps / max(1, total_updates))


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type (lists also from ``"a,b"``)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        if len(args) == 1:
            return _coerce(value, args[0], name)
        return value
    if origin in (list, tuple, Sequence):
        items = [value] if isinstance(value, str) else list(value)
        words = [w.strip() for v in items for w in v.split(",")] if all(isinstance(v, str) for v in items) else items
        inner = args[0] if args else str
        coerced = [_coerce(v, inner, name) for v in words if not (isinstance(v, str) and v == "")]
        return tuple(coerced) if origin is tuple else coerced
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


def field_aliases(cls: type) -> dict[str, str]:
    """``{alias: field}`` of every alias a config's fields declare (``option(aliases=...)``), without dashes."""
    return {
        alias.lstrip("-"): f.name for f in dataclasses.fields(cls) if f.init for alias in f.metadata.get("aliases", ())
    }


def _canonical(keys: Mapping[str, Any], cls: type, fields: Sequence[str], what: str, where: str = "") -> dict[str, Any]:
    """``keys`` with aliases replaced by field names; unknown keys (or a field given twice) raise ValueError."""
    aliases = field_aliases(cls)
    out: dict[str, Any] = {}
    bad = sorted(k for k in keys if k not in fields and k not in aliases)
    if bad:
        raise ValueError(f"Unknown {what} {bad}{where}; valid {what.split()[-1]}: {', '.join(sorted(fields))}.")
    for key, value in keys.items():
        name = aliases.get(key, key)
        if name in out:
            raise ValueError(f"{name} is given twice{where or ' in the ' + what} (as {name} and as an alias of it).")
        out[name] = value
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with defaults, wrapped at spaces only (Hub ids and paths stay whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def _choice_text(choice: Any) -> str:
    return "none" if choice is None else str(choice)


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    """The command-line parser of config dataclass ``cls``: ``--config`` plus one snake_case flag per field (and its
    aliases), each with its help, default and choices, built by transformers' `HfArgumentParser`.

    Values stay strings here (`load_config` converts them and ``validate()`` checks them, naming the fix), so the
    choices are listed in the help text rather than enforced by argparse.
    """
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
            if names and names[0].startswith("--"):  # a field: one spelling, snake_case (no --kebab-case twin)
                names = tuple(n for n in names if "-" not in n[2:])
                choices = kwargs.pop("choices", None)
                if choices is not None:
                    listed = ",".join(map(_choice_text, choices))
                    kwargs["help"] = f"{kwargs.get('help', '')} Choices: {listed.replace(',', ', ')}."
                    kwargs["metavar"] = "{" + listed + "}"
                kwargs.pop("type", None)
            return super().add_argument(*names, **kwargs)

    parser = Parser(cls, description=description, allow_abbrev=False, formatter_class=_HelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with any of these fields (the flags given here win).")
    return parser


def load_config(
    cls: type[T],
    argv: Optional[Sequence[str]] = None,
    description: str = "",
    defaults: Optional[Mapping[str, Any]] = None,
) -> T:
    """Build a ``cls`` dataclass from ``--config file.yaml`` and ``--field value`` overrides (the latter win).

    ``defaults`` (field: value) replace the dataclass defaults, beneath the YAML file and the command line; a script
    uses them for an embedded default run. Unknown keys, in the YAML file, the command line or ``defaults``, are
    rejected with the list of valid ones. A field's aliases (diffusers' names) are accepted everywhere.
    ``--resume_from_checkpoint`` takes ``latest``, ``true``/``false`` or the path of the run's state folder.
    """
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    parser = build_parser(cls, description)
    values: dict[str, Any] = _canonical(dict(defaults or {}), cls, fields, "default fields")
    config_path = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_path.add_argument("--config", type=Path, default=None)
    path = config_path.parse_known_args(argv)[0].config
    values.pop("config", None)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of field: value.")
        values.update(_canonical(loaded, cls, fields, "keys", f" in {path}"))
    given, unknown = parser.parse_known_args(argv, namespace=argparse.Namespace(**values))
    if unknown:
        parser.error(f"unknown arguments {unknown}; valid fields: {', '.join(sorted(fields))}")
    values = {k: v for k, v in vars(given).items() if k in hints}
    if "resume" in values:
        values["resume"] = _resume_value(values["resume"], values.get("output_dir"), cls)
    return cls(**{k: _coerce(v, hints[k], k) for k, v in values.items()})


def _resume_value(value: Any, output_dir: Any, cls: type) -> Any:
    """``--resume_from_checkpoint``: ``latest`` -> True; a path -> True when it is this run's state folder (or the
    run folder), else FileNotFoundError/ValueError; anything else is left to the bool conversion."""
    if not isinstance(value, str) or value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value
    if value.lower() == RESUME_LATEST:
        return True
    output_dir = (
        output_dir
        if output_dir is not None
        else next(f.default for f in dataclasses.fields(cls) if f.name == "output_dir")
    )
    path, run = Path(value).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    if path in (run, run / "state"):
        return True
    raise ValueError(
        f"--resume_from_checkpoint {value}: this trainer keeps one resumable state per run, {run / 'state'}; pass "
        f"latest (or that folder), or --output_dir {path.parent if path.name == 'state' else path} to resume that run."
    )


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
    "build_parser",
    "check_choice",
    "check_float",
    "check_int",
    "check_model_path",
    "config_to_dict",
    "describe",
    "field_aliases",
    "load_config",
    "option",
    "retune",
]
