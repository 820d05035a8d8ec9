"""Adapter folders: loading ours safely, and importing the NaRA authors' format.

Our folder is peft's: ``adapter_config.json`` + ``adapter_model.safetensors``, written by
``model.save_pretrained(path)``. Keys: ``base_model.model.<module>.nara_A.weight`` (r × d_in),
``…nara_B.weight`` (d_out × r) and ``base_model.nara_hypernet.<…>`` for the shared hypernetwork
(``embedding.W`` is the Fourier buffer, ``generator.layers.{0,2,4}`` the MLP, ``constant`` the NaRA-C core).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Union

import peft
import torch
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter import NoiseConditionedAdapter
from .config import NARA_PEFT_TYPE, NaRAConfig
from .tuner import quiet_peft_wrapping, register_with_peft

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REFERENCE_WEIGHTS_NAME = "adapter_model.bin"
MODEL_PREFIX = "base_model.model."
HYPERNET_PREFIX = "base_model.nara_hypernet."

PathLike = Union[str, Path]


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded onto the given base model."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"No {path.name} in {path.parent}: is this an adapter folder written by save_pretrained?"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{path} is not valid JSON ({err}); re-save the adapter.") from err


def _is_reference_config(raw: dict[str, Any]) -> bool:
    return "r_ab" in raw or "c_scale" in raw


def read_config(folder: PathLike) -> NaRAConfig:
    """Read and validate the `NaRAConfig` of an adapter folder (unknown keys are ignored with a warning)."""
    folder = Path(folder)
    raw = _read_json(folder / CONFIG_NAME)
    if _is_reference_config(raw):
        raise AdapterLoadError(
            f"{folder} holds an adapter in the NaRA authors' format (r_ab, c_scale, …); convert it first with "
            f"nd.convert_reference_checkpoint({str(folder)!r}, <new folder>)."
        )
    if raw.get("peft_type") != NARA_PEFT_TYPE:
        raise AdapterLoadError(
            f"{folder} holds a {raw.get('peft_type')!r} adapter, not a NaRA one; load it with "
            "peft.PeftModel.from_pretrained instead."
        )
    known = {f.name for f in dataclasses.fields(NaRAConfig) if f.init}
    unknown = sorted(set(raw) - known)
    if unknown:
        warnings.warn(f"Ignoring unknown keys in {folder / CONFIG_NAME}: {unknown}", stacklevel=3)
    return NaRAConfig(**{k: v for k, v in raw.items() if k in known})


def read_weights(folder: PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors``, turning a missing or damaged file into a clear error."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        hint = ""
        if (folder / REFERENCE_WEIGHTS_NAME).is_file():
            hint = (
                f" There is an {REFERENCE_WEIGHTS_NAME} (pickle), which is never loaded directly; if the NaRA "
                "authors' code wrote it, convert it with nd.convert_reference_checkpoint."
            )
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {folder}.{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(
            f"{path} is truncated or corrupt ({err}); re-save the adapter or copy the file again."
        ) from err


def _check_fits(base: nn.Module, config: NaRAConfig, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Raise `AdapterLoadError` unless every tensor of ``weights`` has a home of the right shape in ``base``."""
    problems: list[str] = []
    for key, tensor in weights.items():
        if key.startswith(HYPERNET_PREFIX):
            continue
        for part, expect in ((".nara_A.weight", "A"), (".nara_B.weight", "B")):
            if key.startswith(MODEL_PREFIX) and key.endswith(part):
                path = key[len(MODEL_PREFIX) : -len(part)]
                try:
                    module = base.get_submodule(path)
                except AttributeError:
                    problems.append(f"{path}: no such module in the base model")
                    break
                if not isinstance(module, nn.Linear):
                    problems.append(f"{path}: is a {type(module).__name__}, not nn.Linear")
                    break
                shape = (config.r, module.in_features) if expect == "A" else (module.out_features, config.r)
                if tuple(tensor.shape) != shape:
                    problems.append(f"{key}: shape {tuple(tensor.shape)} in the file, {shape} expected")
                break
        else:
            if "modules_to_save" not in key:
                problems.append(f"{key}: not a NaRA key")
    expected = {HYPERNET_PREFIX + k: v.shape for k, v in NoiseConditionedAdapter(config).state_dict().items()}
    for key, shape in expected.items():
        if key not in weights:
            problems.append(f"{key}: missing from the file")
        elif weights[key].shape != shape:
            problems.append(f"{key}: shape {tuple(weights[key].shape)} in the file, {tuple(shape)} expected")
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  …" if len(problems) > 10 else "")
        raise AdapterLoadError(
            f"The adapter in {folder} does not fit this base model (was it trained on another model or with "
            f"another config?):\n  {shown}"
        )


def load_nara_model(
    model: nn.Module, path: PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> peft.PeftModel:
    """Load a NaRA adapter folder onto ``model`` and return the PeftModel.

    Everything is checked before the model is touched: the config, the safetensors file and the shape of every
    tensor against the base model's layers. If injection still fails, the adapter is unloaded again, so a failed
    load leaves ``model`` as it was.

    Args:
        model: The base model the adapter was trained on.
        path: Folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter_name: Name to give the adapter.
        is_trainable: Keep the adapter trainable (default: frozen, model in eval mode).

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        ValueError (`AdapterLoadError`): the folder is damaged, in the authors' format, or does not fit ``model``.
    """
    register_with_peft()
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"No adapter folder at {folder}.")
    config = read_config(folder)
    weights = read_weights(folder)
    _check_fits(model, config, weights, folder)

    config.inference_mode = not is_trainable
    model_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, peft.PeftModel)
    with quiet_peft_wrapping():
        peft_model = model_cls(model, config, adapter_name=adapter_name)
    try:
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if ".nara_" in k and f".{adapter_name}" in k]
        if missing or result.unexpected_keys:
            raise AdapterLoadError(
                f"Loading {folder} left adapter weights unset {missing[:5]} or unused {result.unexpected_keys[:5]}."
            )
    except BaseException:
        peft_model.base_model.unload()
        raise
    if not is_trainable:
        peft_model.eval()
    return peft_model


# -- the NaRA authors' adapter folders --------------------------------------------------------------------
_UNSUPPORTED_REFERENCE = {
    "input_mode": ("nd", "both"),
}


def _convert_reference_config(raw: dict[str, Any]) -> NaRAConfig:
    input_mode = raw.get("input_mode", "nl")
    if input_mode in _UNSUPPORTED_REFERENCE["input_mode"]:
        raise AdapterLoadError(
            f"input_mode={input_mode!r} (noise density) is not supported; only 'nl' and 'constant' adapters convert."
        )
    if raw.get("mapper_groups"):
        raise AdapterLoadError("Adapters with mapper_groups (one hypernetwork per module group) are not supported.")
    if raw.get("bias", "none") != "none":
        raise AdapterLoadError(f"Adapters with bias={raw['bias']!r} are not supported; only bias='none'.")
    if raw.get("fan_in_fan_out", False):
        raise AdapterLoadError("Adapters with fan_in_fan_out=True are not supported.")
    return NaRAConfig(
        r=int(raw["r_ab"]),
        target_modules=raw.get("target_modules"),
        core_scale=float(raw.get("c_scale", 1.0)),
        lora_dropout=float(raw.get("lora_dropout", 0.0)),
        scaling=float(raw.get("scale_ab", 1.0)),
        embedding=raw.get("embedding_type", "fourier"),
        embedding_dim=int(raw.get("embedding_dim", 64)),
        hidden_dims=(int(raw.get("fnn_hidden_size_1", 256)), int(raw.get("fnn_hidden_size_2", 512))),
        core="constant" if input_mode == "constant" else "noise",
        modules_to_save=raw.get("modules_to_save"),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        task_type=raw.get("task_type"),
    )


def _convert_reference_key(key: str) -> str:
    if key.startswith(MODEL_PREFIX) and key.endswith((".lora_A", ".lora_B")):
        return key.replace(".lora_A", ".nara_A.weight").replace(".lora_B", ".nara_B.weight")
    for old, new in (
        ("base_model.global_mapper.model.", HYPERNET_PREFIX + "generator.layers."),
        ("base_model.embedding_layers.NL_emb.", HYPERNET_PREFIX + "embedding."),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    if key == "base_model.constant_c":
        return HYPERNET_PREFIX + "constant"
    raise AdapterLoadError(f"Unknown key {key!r} in the reference checkpoint; it cannot be converted.")


def _write_folder_atomically(dst: Path, write: Any, overwrite: bool) -> None:
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True or choose another folder.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        write(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert_reference_checkpoint(src: PathLike, dst: PathLike, overwrite: bool = False) -> Path:
    """Convert an adapter folder written by the NaRA authors' code into ours.

    Reads their ``adapter_config.json`` (``peft_type: "NARA"``, ``r_ab``, ``c_scale``, ``scale_ab``, …) and
    ``adapter_model.bin`` (loaded with ``torch.load(weights_only=True)``; ``adapter_model.safetensors`` is used
    instead when present) and writes ``dst`` atomically. The converted adapter computes the same outputs:
    same A, B, hypernetwork and Fourier buffer, and the same ``B·Cᵀ·A`` orientation.

    Returns:
        The path of the new folder, loadable with ``nd.load_nara_model(base, dst)``.
    """
    src, dst = Path(src), Path(dst)
    raw = _read_json(src / CONFIG_NAME)
    if not _is_reference_config(raw):
        raise AdapterLoadError(f"{src} is not in the NaRA authors' format (no r_ab / c_scale in its config).")
    config = _convert_reference_config(raw)
    if (src / WEIGHTS_NAME).is_file():
        state = read_weights(src)
    elif (src / REFERENCE_WEIGHTS_NAME).is_file():
        try:
            state = torch.load(src / REFERENCE_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for truncated or hostile pickles
            raise AdapterLoadError(f"{src / REFERENCE_WEIGHTS_NAME} cannot be read safely ({err}).") from err
    else:
        raise FileNotFoundError(f"No {REFERENCE_WEIGHTS_NAME} or {WEIGHTS_NAME} in {src}.")
    converted = {_convert_reference_key(k): v.detach().contiguous() for k, v in state.items()}
    expected = set(NoiseConditionedAdapter(config).state_dict())
    missing = sorted(expected - {k[len(HYPERNET_PREFIX) :] for k in converted if k.startswith(HYPERNET_PREFIX)})
    if missing:
        raise AdapterLoadError(f"The reference checkpoint lacks hypernetwork tensors: {missing}.")

    def write(folder: Path) -> None:
        config.save_pretrained(str(folder))
        save_file(converted, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    _write_folder_atomically(dst, write, overwrite)
    return dst
