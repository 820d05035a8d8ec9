"""The generation length an adapter was trained for, stored next to its weights and used by every sampler entry point.

Fine-tuning pads every answer with EOS up to ``max_length`` (`data.tokenize_sft`), so the adapter learns to fill
``max_length - prompt_length`` answer positions, at the noise levels of that canvas. `run_finetune` writes
``sampling.json`` (`SAMPLING_CONFIG_NAME`) into every adapter folder it saves::

    {"gen_length": 35, "padding": "eos", "max_length": 72, "answer_positions": [35, 35]}

``gen_length`` is ``max_length`` minus the median prompt length of the training set; ``answer_positions`` is the
range over the training set. `load_adapter` puts the record on the loaded model (`TRAINED_SAMPLING_ATTR`);
`sampler_settings` then fills a missing ``gen_length`` (one block, one token per step) and warns once when a caller
asks for another length. A folder without the file (older adapters, other tools') keeps the caller's defaults.
"""

from __future__ import annotations

import json
import statistics
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ..core.folders import SAMPLING_CONFIG_NAME
from ..core.serialization import NaRALoadError

#: Attribute of a loaded model holding its adapter's sampling record.
TRAINED_SAMPLING_ATTR = "nara_trained_sampling"


def sampling_record(dataset: Any) -> dict[str, Any]:
    """The record of an `SFTDataset` (``max_length``, ``prompt_lengths``): answer positions and padding."""
    max_length = int(dataset.max_length)
    prompts = [int(p) for p in dataset.prompt_lengths.tolist()]
    positions = [max_length - p for p in prompts]
    return {
        "gen_length": max_length - int(statistics.median_low(prompts)),
        "padding": "eos",
        "max_length": max_length,
        "answer_positions": [min(positions), max(positions)],
    }


def write_sampling_record(folder: Union[str, Path], record: Mapping[str, Any]) -> None:
    """Write ``record`` as ``<folder>/sampling.json``."""
    (Path(folder) / SAMPLING_CONFIG_NAME).write_text(json.dumps(dict(record), indent=1) + "\n", encoding="utf-8")


def read_sampling_record(folder: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The record in ``folder``, or None when there is none (or it has no positive integer ``gen_length``).

    Raises:
        NaRALoadError: the file is not JSON.
    """
    path = Path(folder) / SAMPLING_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NaRALoadError(f"{path} is not valid JSON ({err}); delete it to sample with explicit settings.") from err
    gen_length = record.get("gen_length") if isinstance(record, dict) else None
    if not isinstance(gen_length, int) or isinstance(gen_length, bool) or gen_length < 1:
        warnings.warn(f"{path} has no positive integer gen_length; ignoring it.", stacklevel=2)
        return None
    return record


def trained_sampling(model: nn.Module) -> Optional[dict[str, Any]]:
    """The sampling record a loaded (or just trained) model carries, if any."""
    return getattr(model, TRAINED_SAMPLING_ATTR, None)


def set_trained_sampling(model: nn.Module, record: Optional[Mapping[str, Any]]) -> nn.Module:
    """Put ``record`` on ``model`` (nothing when None); returns ``model``."""
    if record is not None:
        object.__setattr__(model, TRAINED_SAMPLING_ATTR, dict(record))
    return model


def _warned(model: nn.Module) -> set[int]:
    """The lengths this model has already warned about."""
    return model.__dict__.setdefault("_nara_sampling_warned", set())


def sampler_settings(
    model: nn.Module, settings: Mapping[str, Any], fallback: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """``settings`` (`generate` keyword arguments) with the trained length where the caller gave none.

    A ``gen_length`` of None (or missing) becomes the trained length, with ``steps`` and ``block_length`` (when None
    or missing) the same: one block, one token per step. Without a record, missing settings come from ``fallback``.
    A ``gen_length`` other than the trained one warns once per model and length.
    """
    out = {k: v for k, v in settings.items() if v is not None or k not in ("gen_length", "steps", "block_length")}
    record = trained_sampling(model)
    if record is None:
        for key, value in (fallback or {}).items():
            out.setdefault(key, value)
        if "gen_length" in out:
            out.setdefault("steps", out["gen_length"])
        return out
    trained = int(record["gen_length"])
    if "gen_length" not in out:
        out["gen_length"] = trained
        out.setdefault("block_length", trained)
    elif int(out["gen_length"]) != trained and int(out["gen_length"]) not in _warned(model):
        _warned(model).add(int(out["gen_length"]))
        warnings.warn(
            f"gen_length={out['gen_length']} but the adapter was trained to fill {trained} answer positions "
            f"(max_length {record.get('max_length')}, answers EOS-padded): it will see a canvas and noise levels it "
            f"never saw. Leave gen_length unset to sample as trained.",
            UserWarning,
            stacklevel=3,
        )
    out.setdefault("steps", out["gen_length"])
    if fallback and "block_length" in fallback and "block_length" not in out:
        block = int(fallback["block_length"])
        out["block_length"] = block if int(out["gen_length"]) % block == 0 else None
    return out


__all__ = [
    "TRAINED_SAMPLING_ATTR",
    "read_sampling_record",
    "sampler_settings",
    "sampling_record",
    "set_trained_sampling",
    "trained_sampling",
    "write_sampling_record",
]
