"""Model cards for adapter folders people can publish: a README.md with the Hub's YAML front matter.

Every NaRA adapter folder gets one (``model.save_pretrained``, ``save_nara_weights``): the base model as a Hub id
(never a path on the machine that trained it), the method (NaRA, NaRA-C or the identity core), the config, a usage
snippet and, optionally, what the caller knows about training (data, steps, scores) through ``extra=``.

The base model is a Hub id ``owner/name`` or nothing. A local folder is traced back to a Hub id when it is a Hub
cache snapshot (``…/models--owner--name/snapshots/<rev>``) or its ``config.json`` / ``model_index.json`` records a
``_name_or_path`` that looks like one; otherwise ``base_model`` is left out and the card says so.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .config import NaRAConfig
from .folders import ADAPTER_CONFIG_NAME, MODEL_CARD_NAME

#: Keys of ``extra`` that are Hub metadata and go to the YAML front matter; every other key is listed in the body.
METADATA_KEYS = ("license", "language", "datasets", "metrics", "pipeline_tag", "tags")
#: The tags every NaRA card carries.
NARA_TAGS = ("nara", "peft", "diffusion")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_UNKNOWN_BASE_NOTE = (
    "The base model was loaded from a local folder that records no Hub id, so `base_model` is not set. Name it "
    'when saving (`model.save_pretrained(path, base_model="owner/name")`) or add it to the front matter.'
)


def _hub_id_shaped(name: Any) -> bool:
    if not isinstance(name, str) or len(name) > 96 or not _HUB_ID.fullmatch(name):
        return False
    return "--" not in name and ".." not in name and not name.endswith(".git")


def looks_like_hub_id(name: Any) -> bool:
    """True for a string shaped like a Hub repo id ``owner/name`` that is not an existing local path."""
    return _hub_id_shaped(name) and not os.path.exists(name)


def _recorded_hub_id(path: Path) -> Optional[str]:
    """The Hub id a local model folder (or file) came from: a cache snapshot's repo, or a recorded ``_name_or_path``."""
    for parts in (path.absolute().parts, path.resolve().parts):
        for part, after in itertools.pairwise(parts):
            pieces = part.split("--")
            if after == "snapshots" and len(pieces) == 3 and pieces[0] == "models":
                if looks_like_hub_id(repo := f"{pieces[1]}/{pieces[2]}"):
                    return repo
    folder = path if path.is_dir() else path.parent
    for config in (folder / "config.json", folder / "model_index.json"):
        try:
            recorded = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if looks_like_hub_id(recorded):
            return recorded
    return None


def hub_base_model(*candidates: Optional[Union[str, os.PathLike]]) -> Optional[str]:
    """The Hub id of the base model: the first of ``candidates`` (names or paths, most trusted first) that is a Hub id
    or a local folder traceable to one (see the module docstring); None when none is."""
    for candidate in candidates:
        if candidate is None or str(candidate) == "":
            continue
        name = os.fspath(candidate)
        path = Path(name).expanduser()
        if path.exists():
            recorded = _recorded_hub_id(path)
            if recorded is not None:
                return recorded
        elif looks_like_hub_id(name):
            return name
    return None


# -- rendering ----------------------------------------------------------------------------------------------------
def method_name(config: NaRAConfig) -> str:
    """``"NaRA"``, ``"NaRA-C"`` or ``"LoRA (identity core)"``."""
    return {"noise": "NaRA", "constant": "NaRA-C", "identity": "LoRA (identity core)"}[config.core]


def _method_text(config: NaRAConfig) -> str:
    layer = "Every adapted linear layer computes `W0·x + s·B·Cᵀ·A·x`"
    if config.core == "noise":
        return (
            f"**NaRA** (noise-aware low-rank adaptation). {layer}, where the r × r core `C = C(λ) = I + η·F(e(λ))` "
            "is generated from the noise level λ ∈ [0, 1] by one small hypernetwork shared by all adapted layers: the "
            "adapter changes with the noise level of each denoising step."
        )
    if config.core == "constant":
        return (
            f"**NaRA-C** (NaRA with a constant core). {layer}, where `C = I + η·K` is one learned r × r matrix "
            "shared by all adapted layers, the same at every noise level."
        )
    return f"**LoRA through NaRA's layers** (identity core). {layer} with `C = I`: plain low-rank adaptation."


def _config_rows(config: NaRAConfig) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("method", method_name(config)),
        ("r", config.r),
        ("target_modules", config.target_modules),
    ]
    if config.exclude_modules:
        rows.append(("exclude_modules", config.exclude_modules))
    if config.core != "identity":
        rows.append(("core_scale (η)", config.core_scale))
    rows += [("scaling (s)", config.effective_scaling), ("lora_dropout", config.lora_dropout)]
    if config.core == "noise":
        rows.append(("embedding", config.embedding))
        if config.embedding != "raw":
            rows.append(("embedding_dim", config.embedding_dim))
        if config.embedding == "fourier":
            rows.append(("fourier_scale", config.fourier_scale))
        rows.append(("hidden_dims", list(config.hidden_dims)))
        rows.append(("noise_input", config.noise_input))
        if config.noise_input == "timestep":
            rows.append(("num_train_timesteps", config.num_train_timesteps))
    if config.modules_to_save:
        rows.append(("modules_to_save", config.modules_to_save))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _config_table(config: NaRAConfig) -> str:
    lines = ["| setting | value |", "| --- | --- |"]
    for name, value in _config_rows(config):
        cell = _cell(value).replace("|", "\\|")  # a regex target_modules may hold "|"
        lines.append(f"| {name} | {cell} |")
    return "\n".join(lines)


def _bullets(items: Mapping[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in items.items():
        if isinstance(value, Mapping):
            lines.append(f"{indent}- **{key}**:")
            lines += _bullets(value, indent + "  ")
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            lines.append(f"{indent}- **{key}**: {f'{shown:.4g}' if isinstance(shown, float) else shown}")
    return lines


def _default_usage(
    base_model: Optional[str], adapter_id: str, base_class: Optional[type], needs_noise_level: bool
) -> str:
    name = base_model or "<the base model>"
    if base_class is not None and hasattr(base_class, "from_pretrained"):
        module = base_class.__module__
        package = module.split(".")[0] if module.split(".")[0] in ("transformers", "diffusers") else module
        load = f'from {package} import {base_class.__name__}\n\nbase = {base_class.__name__}.from_pretrained("{name}")'
    else:
        load = f"base = ...  # {name}, loaded as for training"
    snippet = f'import nara_diffusion as nd\n{load}\nmodel = nd.load_nara_model(base, "{adapter_id}")'
    if needs_noise_level:
        snippet += "\noutput = model(input_ids, noise_level=lam)  # λ in [0, 1] (a timestep if noise_input='timestep')"
    return snippet


def render_model_card(
    config: Union[NaRAConfig, Mapping[str, NaRAConfig]],
    *,
    base_model: Optional[str],
    extra: Optional[Mapping[str, Any]] = None,
    adapter_id: Optional[str] = None,
    base_class: Optional[type] = None,
    usage: Optional[str] = None,
    library_name: str = "peft",
    tags: Iterable[str] = (),
) -> str:
    """The text of the card (see `write_model_card`)."""
    configs = {"": config} if isinstance(config, NaRAConfig) else dict(config)
    if not configs:
        raise ValueError("A model card needs at least one NaRAConfig.")
    if base_model is not None and not _hub_id_shaped(base_model):
        raise ValueError(f"base_model must be a Hub id 'owner/name' (or None), not {base_model!r}.")
    extra = dict(extra or {})
    methods = sorted({method_name(c) for c in configs.values()})
    all_tags = [*NARA_TAGS, *(t for c in configs.values() for t in ("nara-c",) if c.core == "constant"), *tags]
    all_tags += list(extra.pop("tags", None) or [])
    if base_model is not None:
        all_tags.append(f"base_model:adapter:{base_model}")
    meta: dict[str, Any] = {"library_name": library_name}
    if base_model is not None:
        meta["base_model"] = base_model
    meta["tags"] = list(dict.fromkeys(str(t) for t in all_tags))
    meta.update({k: extra.pop(k) for k in METADATA_KEYS if k in extra})
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)

    target = base_model or "a local base model"
    body = [f"# {' / '.join(methods)} adapter for {target}", ""]
    if base_model is None:
        body += [f"> {_UNKNOWN_BASE_NOTE}", ""]
    texts = list(dict.fromkeys(_method_text(c) for c in configs.values()))
    body += [*texts, "", "Made with nara-diffusion (NaRA adapters on peft's tuner classes).", ""]
    body += ["## Usage", "", "```python"]
    noisy = any(c.needs_noise_level for c in configs.values())
    body += [usage or _default_usage(base_model, adapter_id or "<repo or folder>", base_class, noisy), "```", ""]
    for component, cfg in configs.items():
        body += [f"## Configuration{f' ({component})' if component else ''}", "", _config_table(cfg), ""]
    if extra:
        body += ["## Training", "", *_bullets(extra), ""]
    return f"---\n{front}---\n\n" + "\n".join(body).rstrip() + "\n"


def write_model_card(
    folder: Union[str, os.PathLike],
    config: Union[NaRAConfig, Mapping[str, NaRAConfig]],
    *,
    base_model: Optional[str],
    extra: Optional[Mapping[str, Any]] = None,
    adapter_id: Optional[str] = None,
    base_class: Optional[type] = None,
    usage: Optional[str] = None,
    library_name: str = "peft",
    tags: Iterable[str] = (),
) -> Path:
    """Write ``<folder>/README.md`` (replacing any): YAML front matter, then the method, usage and configuration.

    Args:
        folder: The adapter folder.
        config: The adapter's config, or one per component (``{"unet": cfg, "text_encoder": cfg}``).
        base_model: The base model's Hub id ``owner/name``, or None when unknown (a note says so); pass names or
            paths through `hub_base_model` first.
        extra: What the caller knows about training, e.g. ``{"data": "…", "steps": 1000, "scores": {"gsm8k": 0.41}}``
            (listed under "Training", mappings as nested lists). The Hub metadata keys ``license``, ``language``,
            ``datasets``, ``metrics``, ``pipeline_tag`` and ``tags`` (added to NaRA's) go to the front matter.
        adapter_id: Where the adapter will be found (a Hub repo id), for the usage snippet.
        base_class: The base model's class, for the usage snippet.
        usage: The usage snippet (Python), replacing the default ``nd.load_nara_model(base, …)``.
        library_name: The Hub library of the folder: ``"peft"`` (``adapter_config.json`` folders, which
            ``peft.PeftModel.from_pretrained`` loads) or ``"nara-diffusion"`` (pipeline folders, for
            ``pipe.load_nara_weights``; no other library loads them).
        tags: More tags.

    Returns:
        The path of the card.
    """
    text = render_model_card(
        config,
        base_model=base_model,
        extra=extra,
        adapter_id=adapter_id,
        base_class=base_class,
        usage=usage,
        library_name=library_name,
        tags=tags,
    )
    path = Path(folder) / MODEL_CARD_NAME
    _replace_text(path, text)
    return path


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file beside it, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_base_model_field(config_path: Union[str, os.PathLike], base_model: Optional[str]) -> None:
    """Rewrite ``base_model_name_or_path`` in a saved ``adapter_config.json`` (everything else, ``weights_sha256``
    included, unchanged; the checksum covers the weights file only)."""
    path = Path(config_path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("base_model_name_or_path") == base_model:
        return
    raw["base_model_name_or_path"] = base_model
    _replace_text(path, json.dumps(raw, indent=2, sort_keys=True))  # peft's layout


def config_name_or_path(module: Any) -> Optional[str]:
    """``_name_or_path`` of a transformers config (attribute) or a diffusers one (a mapping), if any."""
    config = getattr(module, "config", None)
    value = config.get("_name_or_path") if isinstance(config, Mapping) else getattr(config, "_name_or_path", None)
    return value if isinstance(value, str) else None


def finish_adapter_folder(
    peft_model: Any,
    folder: Union[str, os.PathLike],
    adapter_names: Optional[Iterable[str]] = None,
    *,
    base_model: Optional[str] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Optional[str]:
    """Make a folder just written by peft's ``save_pretrained`` publishable: ``README.md`` becomes NaRA's card, which
    names the base model only by its Hub id, and ``base_model_name_or_path`` in each saved ``adapter_config.json``
    becomes that Hub id when one is known (a local path peft recorded stays for local use until `push_to_hub`).

    Args:
        peft_model: The PeftModel that wrote ``folder``.
        folder: The folder (adapters other than ``"default"`` are in subfolders named after them, as peft saves them).
        adapter_names: The adapters saved (default: all).
        base_model: The base model's Hub id as the user gives it (wins over the names the model records).
        extra: Training facts for the card (see `write_model_card`).

    Returns:
        The Hub id written, or None.
    """
    folder = Path(folder)
    names = list(adapter_names) if adapter_names else list(peft_model.peft_config)
    base = peft_model.get_base_model()
    hub_id = hub_base_model(
        base_model,
        *(peft_model.peft_config[n].base_model_name_or_path for n in names),
        base.__dict__.get("name_or_path"),
        config_name_or_path(base),
    )
    # A Hub id replaces the recorded name; without one the local path peft recorded stays in adapter_config.json, so
    # that evaluation on this machine still finds the base (the card never names it; push_to_hub clears it).
    for name in names if hub_id is not None else ():
        set_base_model_field((folder if name == "default" else folder / name) / ADAPTER_CONFIG_NAME, hub_id)
    shown = "default" if "default" in names else names[0]
    subfolders = [n for n in names if n != "default"]  # peft saves every adapter but "default" in a subfolder
    if subfolders:
        extra = {**(extra or {}), "adapters in subfolders": ", ".join(f"`{n}/`" for n in subfolders)}
    write_model_card(folder, peft_model.peft_config[shown], base_model=hub_id, extra=extra, base_class=type(base))
    return hub_id
