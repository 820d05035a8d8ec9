"""Adapter folders: reading and validating ours (the one reader and fit rule of the package, also used by the
pipeline loaders of `nara_diffusion.image.loaders`), and importing the NaRA authors' format. File names and the
atomic writer are in `nara_diffusion.core.folders`.

Our folder is peft's: ``adapter_config.json`` + ``adapter_model.safetensors``, written by
``model.save_pretrained(path)``, with a model card (``README.md``, `core/model_card.py`) and no path of the machine
that wrote it (``base_model_name_or_path`` is a Hub id or null), so it can be published as it is.
Keys: ``base_model.model.<module>.nara_A.weight`` (r × d_in),
``…nara_B.weight`` (d_out × r) and ``base_model.nara_hypernet.<…>`` for the shared `NoiseConditionedAdapter`
(``embedding.W`` is the Fourier buffer, ``generator.layers.{0,2,4}`` the MLP, ``constant`` the NaRA-C core). The
``nara_hypernet`` segment is the format's historical name for it and is kept, so every folder ever written loads.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import NoiseConditionedAdapter
from .config import NARA_PEFT_TYPE, NaRAConfig, file_sha256
from .folders import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, REFERENCE_WEIGHTS_NAME, write_atomically
from .model_card import looks_like_hub_id
from .tuner import (
    attach_transaction,
    check_targets,
    is_nara_model,
    nara_peft_model_class,
    quiet_peft_wrapping,
    register_with_peft,
)

MODEL_PREFIX = "base_model.model."
#: Where the shared `NoiseConditionedAdapter` of an adapter lives in a state dict (the tuner's ``nara_hypernet``):
#: part of the on-disk key of every saved adapter, so it keeps its historical name (see docs/architecture.md).
ADAPTER_STATE_PREFIX = "nara_hypernet."
HYPERNET_PREFIX = "base_model." + ADAPTER_STATE_PREFIX

PathLike = Union[str, Path]


class NaRALoadError(ValueError):
    """A NaRA adapter that cannot be loaded: a damaged or malformed file, a config field out of range, or weights
    that do not fit the model. The message names the file and the field or tensor; the model was not changed."""


#: The former name of `NaRALoadError`.
AdapterLoadError = NaRALoadError

# Keys peft itself writes into adapter_config.json that are not NaRAConfig fields (ignored without a warning).
_PEFT_EXTRA_KEYS = {"auto_mapping"}


def read_json_object(path: Path, what: str = "adapter config") -> dict[str, Any]:
    """Read a JSON object (``{...}``) from ``path``; anything else is a `NaRALoadError` naming the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"No {path.name} in {path.parent}: is this an adapter folder written by save_pretrained?"
        )
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise NaRALoadError(f"{path} is not valid JSON ({err}); re-save the adapter.") from err
    if not isinstance(raw, dict):
        raise NaRALoadError(
            f"{path} holds a JSON {type(raw).__name__}, not an object of {what} fields; re-save the adapter."
        )
    return raw


def build_config(raw: dict[str, Any], where: str) -> NaRAConfig:
    """`NaRAConfig` from the fields of a config file; unknown keys are ignored with a warning, and a field of the
    wrong type or out of range is a `NaRALoadError` naming ``where`` and the field."""
    known = {f.name for f in dataclasses.fields(NaRAConfig) if f.init}
    unknown = sorted(set(raw) - known - _PEFT_EXTRA_KEYS)
    if unknown:
        warnings.warn(f"Ignoring unknown keys in {where}: {unknown}", stacklevel=3)
    try:
        return NaRAConfig(**{k: v for k, v in raw.items() if k in known})
    except (ValueError, TypeError) as err:
        raise NaRALoadError(f"{where}: {err}") from err


def _is_reference_config(raw: dict[str, Any]) -> bool:
    return "r_ab" in raw or "c_scale" in raw


def read_config(folder: PathLike) -> NaRAConfig:
    """Read and validate the `NaRAConfig` of an adapter folder (unknown keys are ignored with a warning)."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG_NAME
    raw = read_json_object(path)
    if _is_reference_config(raw):
        raise NaRALoadError(
            f"{folder} holds an adapter in the NaRA authors' format (r_ab, c_scale, …); convert it first with "
            f"nd.convert_reference_checkpoint({str(folder)!r}, <new folder>)."
        )
    if raw.get("peft_type") != NARA_PEFT_TYPE:
        raise NaRALoadError(
            f"{path} (field peft_type) describes a {raw.get('peft_type')!r} adapter, not a NaRA one; load it with "
            "peft.PeftModel.from_pretrained instead."
        )
    return build_config(raw, str(path))


def check_tensors(state: dict[str, torch.Tensor], where: Union[str, Path]) -> None:
    """Refuse tensors a NaRA adapter never holds: non-floating dtypes and NaN or infinite values."""
    for key, tensor in state.items():
        if not torch.is_floating_point(tensor):
            raise NaRALoadError(f"{where}: tensor {key} has dtype {tensor.dtype}; NaRA adapters hold floating point.")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise NaRALoadError(
                f"{where}: tensor {key} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the adapter is "
                "damaged (or its training diverged) and would turn every output into NaN."
            )


def read_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file of adapter tensors: ``(tensors, header metadata)``. A truncated or corrupt file, or
    tensors a NaRA adapter never holds (`check_tensors`), are a `NaRALoadError` naming the file (and the tensor)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises several types (SafetensorError, OSError, ValueError, ...)
        raise NaRALoadError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}); re-save the adapter or copy the file again."
        ) from err
    check_tensors(state, path)
    return state, metadata


def read_weights(folder: PathLike, sha256: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors``: a missing, damaged (checksum ``sha256`` when known) or non-finite file
    is a clear error naming the file (and the tensor)."""
    folder = Path(folder)
    path = folder / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        hint = ""
        if (folder / REFERENCE_WEIGHTS_NAME).is_file():
            hint = (
                f" There is an {REFERENCE_WEIGHTS_NAME} (pickle), which is never loaded directly; if the NaRA "
                "authors' code wrote it, convert it with nd.convert_reference_checkpoint."
            )
        raise FileNotFoundError(f"No {ADAPTER_WEIGHTS_NAME} in {folder}.{hint}")
    state, _ = read_tensor_file(path)
    if sha256 is not None and file_sha256(path) != sha256:
        raise NaRALoadError(
            f"{path} is damaged or was replaced: its SHA-256 differs from weights_sha256 in {ADAPTER_CONFIG_NAME}, "
            "written when the adapter was saved. Copy the folder again; if you changed the weights on purpose, delete "
            "weights_sha256 from the config."
        )
    return state


def hypernet_shapes(config: NaRAConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of the shared `NoiseConditionedAdapter` of ``config``, with their shapes (built on the meta device:
    no memory, no draw from the random number generator)."""
    with torch.device("meta"):
        adapter = NoiseConditionedAdapter(config)
    return {k: tuple(v.shape) for k, v in adapter.state_dict().items()}


def adapter_tensor_shapes(model: nn.Module, config: NaRAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an adapter of ``config`` on ``model`` holds, keyed as saved but without the wrapper's prefix:
    ``<module>.nara_A.weight`` (r, d_in), ``<module>.nara_B.weight`` (d_out, r) and ``nara_hypernet.<…>`` (the shared
    `NoiseConditionedAdapter`). The one fit rule of every reader (peft folders here, pipeline folders in
    `nara_diffusion.image.loaders`).

    Raises:
        ValueError: the targets of ``config`` match nothing in ``model`` or are not ``nn.Linear`` (`check_targets`).
    """
    expected: dict[str, tuple[int, ...]] = {}
    for path, module in check_targets(model, config).items():
        expected[f"{path}.nara_A.weight"] = (config.r, module.in_features)
        expected[f"{path}.nara_B.weight"] = (module.out_features, config.r)
    expected.update({ADAPTER_STATE_PREFIX + k: v for k, v in hypernet_shapes(config).items()})
    return expected


def fit_problems(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> list[str]:
    """One line per tensor of ``weights`` that ``expected`` (key → shape) lacks or shapes otherwise, and per expected
    key the file lacks; ``where`` names the model in the lines (e.g. ``"this unet"``)."""
    problems = [
        f"{key}: shape {tuple(tensor.shape)} in the file, {expected[key]} in {where}"
        for key, tensor in weights.items()
        if key in expected and tuple(tensor.shape) != expected[key]
    ]
    problems += [f"{key}: no such NaRA tensor in {where}" for key in weights if key not in expected]
    problems += [f"{key}: missing from the file" for key in expected if key not in weights]
    return problems


def _modules_to_save(base: nn.Module, config: NaRAConfig, targets: set[str], where: str) -> dict[str, Any]:
    """The tensors the file must hold for ``config.modules_to_save`` (matched as peft does: a plain suffix of the
    module name), keyed as peft saves them, with their shapes."""
    names = config.modules_to_save or []
    found = [k for k, _ in base.named_modules(remove_duplicate=False) if k and any(k.endswith(n) for n in names)]
    clashes = [k for k in found if any(k == t or k.startswith(f"{t}.") or t.startswith(f"{k}.") for t in targets)]
    clashes += [k for k in found if any(k.startswith(f"{o}.") for o in found)]
    if clashes:
        raise NaRALoadError(
            f"{where} (field modules_to_save): {sorted(set(clashes))[:5]} overlap the NaRA targets or each other; a "
            "module is either adapted or fully trained, once."
        )
    return {
        f"{MODEL_PREFIX}{path}.{key}": tuple(tensor.shape)
        for path in found
        for key, tensor in base.get_submodule(path).state_dict().items()
    }


def _check_fits(base: nn.Module, config: NaRAConfig, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Raise `NaRALoadError` unless ``weights`` is exactly what an adapter of ``config`` on ``base`` holds: the
    targets of the config are ``nn.Linear`` layers of ``base``, each with its A and B of the right shape, and the
    hypernetwork's tensors (which fix ``r``, ``hidden_dims``, ``embedding`` and ``embedding_dim``) are all there."""
    try:
        shapes = adapter_tensor_shapes(base, config)
    except ValueError as err:
        raise NaRALoadError(
            f"The adapter in {folder} cannot be attached to this base model ({ADAPTER_CONFIG_NAME}, field "
            f"target_modules): {err}"
        ) from err
    # peft's keys: the shared adapter under the tuner (base_model.), the layers under the wrapped model
    expected = {
        ("base_model." if key.startswith(ADAPTER_STATE_PREFIX) else MODEL_PREFIX) + key: shape
        for key, shape in shapes.items()
    }
    targets = {key.rsplit(".nara_", 1)[0] for key in shapes if not key.startswith(ADAPTER_STATE_PREFIX)}
    expected.update(_modules_to_save(base, config, targets, str(folder / ADAPTER_CONFIG_NAME)))
    problems = fit_problems(weights, expected, "this base model")
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  …" if len(problems) > 10 else "")
        raise NaRALoadError(
            f"The adapter in {folder} does not fit this base model (was it trained on another model, or does "
            f"{ADAPTER_CONFIG_NAME} not match {ADAPTER_WEIGHTS_NAME}?):\n  {shown}"
        )


def _refuse_adapted(model: nn.Module) -> None:
    if isinstance(model, peft.PeftModel) or is_nara_model(model):
        kind = "a NaRA adapter"
    elif any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        kind = "peft adapter layers"
    else:
        return
    raise NaRALoadError(
        f"This {type(model).__name__} already carries {kind}; load_nara_model wraps a plain base model. Unload first "
        "(base = peft_model.unload(), or nd.remove_nara(model) for an adapter attached in place) and load onto the "
        "base, or use peft_model.load_adapter(path, adapter_name='other') to add a second adapter."
    )


def _adapter_folder(path: PathLike) -> Path:
    """The local folder of ``path``: a folder as it is, a Hub repo id ``owner/name`` downloaded (config and weights)."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if looks_like_hub_id(str(path)):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=[ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]))
    raise FileNotFoundError(f"No adapter folder at {folder} (nor a Hub repo id owner/name).")


def load_nara_model(
    model: nn.Module, path: PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> peft.PeftModel:
    """Load a NaRA adapter folder onto ``model`` and return the PeftModel.

    Everything is checked before the model is touched: the config (every field), the safetensors file (its
    checksum when the config records one, its tensors finite) and the shape of every tensor against the layers the
    config targets. Attaching is all or nothing: if anything still fails, ``model`` is restored exactly.

    Args:
        model: The base model the adapter was trained on (without adapters).
        path: Folder with ``adapter_config.json`` and ``adapter_model.safetensors``, or a Hub repo id ``owner/name``
            holding them (downloaded with ``huggingface_hub.snapshot_download``).
        adapter_name: Name to give the adapter.
        is_trainable: Keep the adapter trainable (default: frozen, model in eval mode).

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        NaRALoadError (a ValueError): the folder is damaged or malformed, in the authors' format, does not fit
            ``model``, or ``model`` already carries adapters.
    """
    register_with_peft()
    folder = _adapter_folder(path)
    _refuse_adapted(model)
    config = read_config(folder)
    weights = read_weights(folder, sha256=config.weights_sha256)
    _check_fits(model, config, weights, folder)

    config.inference_mode = not is_trainable
    model_cls = nara_peft_model_class(config.task_type)
    with attach_transaction(model, configs=[config]):  # a failure below leaves `model` exactly as it was
        with quiet_peft_wrapping():
            peft_model = model_cls(model, config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if ".nara_" in k and f".{adapter_name}" in k]
        if missing or result.unexpected_keys:
            raise NaRALoadError(
                f"Loading {folder} left adapter weights unset {missing[:5]} or unused {result.unexpected_keys[:5]}."
            )
    if not is_trainable:
        peft_model.eval()
    return peft_model


# -- the NaRA authors' adapter folders --------------------------------------------------------------------
_UNSUPPORTED_REFERENCE = {
    "input_mode": ("nd", "both"),
}


def _convert_reference_config(raw: dict[str, Any], where: Path) -> NaRAConfig:
    if "r_ab" not in raw:
        raise NaRALoadError(f"{where}: the field r_ab (the adapter rank) is missing; the config is incomplete.")

    def number(name: str, cast: type, default: Any) -> Any:
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (cast is int and value != int(value)):
            raise NaRALoadError(
                f"{where}: the field {name} must be {'an integer' if cast is int else 'a number'}, got {value!r}."
            )
        return cast(value)

    input_mode = raw.get("input_mode", "nl")
    if input_mode in _UNSUPPORTED_REFERENCE["input_mode"]:
        raise NaRALoadError(
            f"input_mode={input_mode!r} (noise density) is not supported; only 'nl' and 'constant' adapters convert."
        )
    if raw.get("mapper_groups"):
        raise NaRALoadError("Adapters with mapper_groups (one hypernetwork per module group) are not supported.")
    if raw.get("bias", "none") != "none":
        raise NaRALoadError(f"Adapters with bias={raw['bias']!r} are not supported; only bias='none'.")
    if raw.get("fan_in_fan_out", False):
        raise NaRALoadError("Adapters with fan_in_fan_out=True are not supported.")
    fields = {
        "r": number("r_ab", int, None),
        "target_modules": raw.get("target_modules"),
        "core_scale": number("c_scale", float, 1.0),
        "lora_dropout": number("lora_dropout", float, 0.0),
        "scaling": number("scale_ab", float, 1.0),
        "embedding": raw.get("embedding_type", "fourier"),
        "embedding_dim": number("embedding_dim", int, 64),
        "hidden_dims": (number("fnn_hidden_size_1", int, 256), number("fnn_hidden_size_2", int, 512)),
        "core": "constant" if input_mode == "constant" else "noise",
        "modules_to_save": raw.get("modules_to_save"),
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "task_type": raw.get("task_type"),
    }
    try:
        return NaRAConfig(**fields)
    except (ValueError, TypeError) as err:
        raise NaRALoadError(f"{where}: {err}") from err


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
    raise NaRALoadError(f"Unknown key {key!r} in the reference checkpoint; it cannot be converted.")


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
    raw = read_json_object(src / ADAPTER_CONFIG_NAME)
    if not _is_reference_config(raw):
        raise NaRALoadError(f"{src} is not in the NaRA authors' format (no r_ab / c_scale in its config).")
    config = _convert_reference_config(raw, src / ADAPTER_CONFIG_NAME)
    if (src / ADAPTER_WEIGHTS_NAME).is_file():
        state = read_weights(src)
    elif (src / REFERENCE_WEIGHTS_NAME).is_file():
        try:
            state = torch.load(src / REFERENCE_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for truncated or hostile pickles
            raise NaRALoadError(f"{src / REFERENCE_WEIGHTS_NAME} cannot be read safely ({err}).") from err
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise NaRALoadError(f"{src / REFERENCE_WEIGHTS_NAME} does not hold a state dict (names → tensors).")
        check_tensors(state, src / REFERENCE_WEIGHTS_NAME)
    else:
        raise FileNotFoundError(f"No {REFERENCE_WEIGHTS_NAME} or {ADAPTER_WEIGHTS_NAME} in {src}.")
    converted = {_convert_reference_key(k): v.detach().contiguous() for k, v in state.items()}
    expected = set(hypernet_shapes(config))
    missing = sorted(expected - {k[len(HYPERNET_PREFIX) :] for k in converted if k.startswith(HYPERNET_PREFIX)})
    if missing:
        raise NaRALoadError(f"The reference checkpoint lacks hypernetwork tensors: {missing}.")

    def write(folder: Path) -> None:  # weights first: the config records their checksum
        save_file(converted, str(folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(str(folder))

    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True or choose another folder.")
    return write_atomically(dst, write)
