"""NaRA adapters in diffusers pipelines: the load / save / unload vocabulary of diffusers' LoRA loaders.

The folder mirrors diffusers' LoRA folder (``pytorch_lora_weights.safetensors``)::

    my-nara/
      nara_weights.safetensors   every tensor, keys prefixed by component: ``unet.<module>.nara_A.weight`` (r × d_in),
                                 ``unet.<module>.nara_B.weight`` (d_out × r), ``unet.nara_hypernet.<…>`` (the shared
                                 hypernetwork, with the Fourier buffer ``embedding.W``); ``transformer.`` for SD3 /
                                 Flux; the same under ``text_encoder.`` / ``text_encoder_2.`` / ``text_encoder_3.``
                                 when the text encoders were adapted
      nara_config.json           {"format": "nara-diffusers", "version": 1, "unet": {NaRAConfig}, "text_encoder": …,
                                  "denoiser": {"component", "class", "family", "convention"}}
      README.md                  the model card: base pipeline (a Hub id, never a local path), method, configs, usage

The config is also stored in the safetensors header (key ``nara_config``), so the weights file alone is enough,
as with diffusers' LoRA metadata. Adapter names are not stored: they are given when loading. ``denoiser`` records
the denoiser's class and how λ is read from its timestep (`nara_diffusion.image.denoisers`); a folder without it
(written before SD3 / Flux support) is a UNet adapter.

After ``import nara_diffusion`` every diffusers pipeline has these methods (`nara_diffusion._diffusers_hook`)::

    pipe = DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")
    pipe.load_nara_weights("my-nara")

and, as before, ``nd.image.enable_nara_loading(pipe)`` or ``nd.image.NaRAStableDiffusionXLPipeline``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file
from torch import nn

from .._compat import add_mixin
from ..core import NaRAConfig, NaRALinear, NaRALoadError, attach_transaction, remove_nara
from ..core.folders import MODEL_CARD_NAME, PIPELINE_CONFIG_NAME, PIPELINE_WEIGHTS_NAME, write_atomically
from ..core.model_card import config_name_or_path, hub_base_model, render_model_card
from ..core.serialization import (
    ADAPTER_STATE_PREFIX,
    adapter_tensor_shapes,
    build_config,
    check_tensors,
    fit_problems,
    read_tensor_file,
)
from ..core.tuner import inplace_tuner
from .coexistence import keeping_lora, keeping_nara, lora_unwrapped
from .denoisers import DENOISER_COMPONENTS, FAMILY_BY_NAME, denoiser_of, family_of
from .prompts import PER_STEP_FAMILIES, disable_per_step_prompt_encoding, enable_per_step_prompt_encoding
from .unet import TimestepMap, adapter_names, inject_nara, needs_noise_level

logger = logging.getLogger(__name__)

METADATA_KEY = "nara_config"
FORMAT, FORMAT_VERSION = "nara-diffusers", 1
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_KEY = "denoiser"

PathOrDict = Union[str, Path, dict[str, torch.Tensor]]


# -- state dicts --------------------------------------------------------------------------------------------
def nara_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors of one NaRA adapter of ``model``, keyed without the adapter name.

    Returns:
        ``{"<module>.nara_A.weight": [r, d_in], "<module>.nara_B.weight": [d_out, r], "nara_hypernet.<…>": …}``.
    """
    tuner = inplace_tuner(model)
    if tuner is None:
        raise ValueError(f"{type(model).__name__} carries no NaRA adapter (attach one with nd.image.inject_nara).")
    name = adapter_name or tuner.active_adapters[0]
    if name not in tuner.nara_hypernet:
        raise KeyError(f"No NaRA adapter named {name!r}; available: {list(tuner.nara_hypernet)}.")
    out: dict[str, torch.Tensor] = {}
    layer = re.compile(rf"^(.*\.nara_[AB])\.{re.escape(name)}\.(weight)$")
    hyper = f"nara_hypernet.{name}."
    for key, tensor in model.state_dict().items():
        if key.startswith(hyper):
            out["nara_hypernet." + key[len(hyper) :]] = tensor
        elif match := layer.match(key):
            # a diffusers LoRA loaded on top wraps the NaRA layer: its key is the module's own, without base_layer
            out[f"{match.group(1)}.{match.group(2)}".replace(".base_layer.", ".")] = tensor
    return out


def _config_to_dict(config: NaRAConfig) -> dict[str, Any]:
    raw = config.to_dict()
    raw["hidden_dims"] = list(raw["hidden_dims"])
    raw.pop("inference_mode", None)
    raw.pop("weights_sha256", None)  # the checksum of a core adapter folder's weights; meaningless here
    return raw


def _config_from_dict(raw: Any, where: str) -> NaRAConfig:
    if not isinstance(raw, dict):
        raise NaRALoadError(f"{where} is a JSON {type(raw).__name__}, not an object of NaRAConfig fields.")
    if raw.get("peft_type", "NARA") != "NARA":
        raise NaRALoadError(f"{where} (field peft_type) describes a {raw.get('peft_type')!r} adapter, not NaRA.")
    return build_config(raw, where)


def denoiser_record(component: str, model: nn.Module) -> dict[str, str]:
    """What a saved adapter says about its denoiser: attribute, class, family and λ convention (``nara_config.json``
    field ``denoiser``); a denoiser of no known family was adapted with a custom ``timestep_to_noise_level``."""
    family = family_of(model)
    return {
        "component": component,
        "class": type(model).__name__,
        "family": family.name if family is not None else "custom",
        "convention": family.convention if family is not None else "a custom timestep_to_noise_level",
    }


def save_nara_weights(
    save_directory: Union[str, Path],
    unet: Optional[nn.Module] = None,
    text_encoder: Optional[nn.Module] = None,
    text_encoder_2: Optional[nn.Module] = None,
    *,
    transformer: Optional[nn.Module] = None,
    text_encoder_3: Optional[nn.Module] = None,
    adapter_name: Optional[str] = None,
    is_main_process: bool = True,
    base_model: Optional[str] = None,
    model_card: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write the NaRA adapters of the given components to ``save_directory`` (atomically), with a model card
    (``README.md``).

    Args:
        save_directory: The folder to write (replaced if it exists).
        unet, transformer, text_encoder, text_encoder_2, text_encoder_3: Components carrying NaRA (attached with
            `inject_nara`); at least one; ``unet`` or ``transformer`` (SD3, Flux) is the denoiser.
        adapter_name: Which adapter to save (default: each component's active one).
        is_main_process: Only the main process writes (as with diffusers' ``save_lora_weights``).
        base_model: The base pipeline's Hub id ``owner/name`` (default: traced from the components' configs; a
            local path is never written, see `nara_diffusion.core.model_card.hub_base_model`).
        model_card: Training facts for the card, e.g. ``{"data": "5 photos of sks dog", "steps": 500}``
            (see `nara_diffusion.core.model_card.write_model_card`).

    Returns:
        The folder.
    """
    given = (unet, transformer, text_encoder, text_encoder_2, text_encoder_3)
    parts = {n: m for n, m in zip(COMPONENTS, given, strict=True) if m is not None}
    if not parts:
        raise ValueError(f"Pass at least one of {', '.join(c + '=' for c in COMPONENTS)} (modules carrying NaRA).")
    if unet is not None and transformer is not None:
        raise ValueError("Pass unet= or transformer= (the pipeline's one denoiser), not both.")
    folder = Path(save_directory)
    if not is_main_process:
        return folder
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
    saved: dict[str, NaRAConfig] = {}
    for prefix, model in parts.items():
        tuner = inplace_tuner(model)
        if tuner is None:
            raise ValueError(f"{prefix} carries no NaRA adapter; attach one with nd.image.inject_nara first.")
        name = adapter_name or tuner.active_adapters[0]
        for key, tensor in nara_state_dict(model, name).items():
            tensors[f"{prefix}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()
        saved[prefix] = tuner.peft_config[name]
        configs[prefix] = _config_to_dict(saved[prefix])
        if prefix in DENOISER_COMPONENTS:
            configs[DENOISER_KEY] = denoiser_record(prefix, model)
    text = json.dumps(configs, indent=2, sort_keys=True)
    card = _model_card(parts, saved, base_model, model_card)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PIPELINE_WEIGHTS_NAME), metadata={"format": "pt", METADATA_KEY: text})
        (tmp / PIPELINE_CONFIG_NAME).write_text(text + "\n")
        (tmp / MODEL_CARD_NAME).write_text(card, encoding="utf-8")

    return write_atomically(folder, write)


def _model_card(
    parts: dict[str, nn.Module],
    configs: dict[str, NaRAConfig],
    base_model: Optional[str],
    extra: Optional[Mapping[str, Any]],
) -> str:
    """The README.md of a pipeline adapter folder: the base pipeline's Hub id (or none), one config per component."""
    names = [name for m in parts.values() if (name := config_name_or_path(m))]
    # a component's own folder is <pipeline>/<component>: its pipeline folder may record the Hub id
    hub_id = hub_base_model(base_model, *names, *(Path(name).parent for name in names))
    usage = (
        "import nara_diffusion as nd\n"
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = nd.image.enable_nara_loading(DiffusionPipeline.from_pretrained("{hub_id or "<the base pipeline>"}"))\n'
        'pipe.load_nara_weights("<repo or folder>")\n'
        'image = pipe("a photo of sks dog").images[0]'
    )
    return render_model_card(
        configs,
        base_model=hub_id,
        extra=extra,
        usage=usage,
        library_name="nara-diffusion",
        tags=("diffusers", "text-to-image"),
    )


# -- reading ----------------------------------------------------------------------------------------------
def _resolve(path: Union[str, Path], weight_name: Optional[str], hub_kwargs: dict[str, Any]) -> tuple[Path, Path]:
    """(weights file, config file next to it) for a folder, a weights file or a Hub repo id."""
    path = Path(path)
    name = weight_name or PIPELINE_WEIGHTS_NAME
    subfolder = hub_kwargs.pop("subfolder", None)
    local = path / subfolder if subfolder else path
    if local.is_dir():
        return local / name, local / PIPELINE_CONFIG_NAME
    if local.is_file():
        return local, local.parent / PIPELINE_CONFIG_NAME
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith((".", "/")):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        weights = Path(hf_hub_download(str(path), name, subfolder=subfolder, **hub_kwargs))
        try:
            config = Path(hf_hub_download(str(path), PIPELINE_CONFIG_NAME, subfolder=subfolder, **hub_kwargs))
        except EntryNotFoundError:
            config = weights.parent / PIPELINE_CONFIG_NAME
        return weights, config
    raise FileNotFoundError(
        f"No NaRA weights at {path}: not a folder, a {PIPELINE_WEIGHTS_NAME} file, or a Hub repo id."
    )


def read_nara_weights(
    path_or_dict: PathOrDict,
    configs: Optional[dict[str, NaRAConfig]] = None,
    *,
    weight_name: Optional[str] = None,
    **hub_kwargs: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, NaRAConfig]]:
    """Read a NaRA adapter: ``({"unet.<key>": tensor, …}, {"unet": NaRAConfig, …})``.

    Args:
        path_or_dict: A folder written by `save_nara_weights`, its ``nara_weights.safetensors``, a Hub repo id, or
            a state dict with ``unet.`` / ``transformer.`` / ``text_encoder.`` / ``text_encoder_2.`` /
            ``text_encoder_3.`` keys (then give ``configs``).
        configs: The configs per component, for a state dict (or to override those stored with the weights).
        weight_name: File name inside the folder (default ``nara_weights.safetensors``).
        **hub_kwargs: ``subfolder``, ``revision``, ``cache_dir``, ``token``, ``local_files_only`` for the Hub.
    """
    state, configs, _ = read_nara_folder(path_or_dict, configs, weight_name=weight_name, **hub_kwargs)
    return state, configs


def read_nara_folder(
    path_or_dict: PathOrDict,
    configs: Optional[dict[str, NaRAConfig]] = None,
    *,
    weight_name: Optional[str] = None,
    **hub_kwargs: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, NaRAConfig], Optional[dict[str, str]]]:
    """`read_nara_weights` plus the folder's ``denoiser`` record (`denoiser_record`; None when not stored)."""
    if configs is not None and not all(isinstance(c, NaRAConfig) for c in configs.values()):
        raise TypeError("configs= maps component names to NaRAConfig objects, e.g. {'unet': NaRAConfig(r=4)}.")
    if isinstance(path_or_dict, dict):
        if not configs:
            raise NaRALoadError(
                "A state dict carries no NaRA config: pass configs={'unet': NaRAConfig(...), ...}, or load the "
                "folder written by save_nara_weights."
            )
        if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in path_or_dict.items()):
            raise NaRALoadError("The state dict must map names (str) to tensors.")
        check_tensors(path_or_dict, "the state dict")
        return dict(path_or_dict), dict(configs), None
    weights_path, config_path = _resolve(path_or_dict, weight_name, dict(hub_kwargs))
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"No {weights_path.name} in {weights_path.parent}; was it written by save_nara_weights?"
        )
    state, metadata = read_tensor_file(weights_path)
    if configs:
        return state, dict(configs), None
    if config_path.is_file():
        where = str(config_path)
    elif METADATA_KEY in metadata:
        where = f"the header of {weights_path}"
    else:
        raise FileNotFoundError(f"No {PIPELINE_CONFIG_NAME} beside {weights_path} and no NaRA config in its header.")
    try:
        raw = json.loads(config_path.read_bytes().decode("utf-8") if config_path.is_file() else metadata[METADATA_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise NaRALoadError(f"{where} is not valid JSON ({err}).") from err
    if not isinstance(raw, dict):
        raise NaRALoadError(f"{where} holds a JSON {type(raw).__name__}, not a NaRA pipeline adapter config.")
    if raw.get("format") != FORMAT:
        raise NaRALoadError(f"{where} is not a NaRA pipeline adapter config (format {raw.get('format')!r}).")
    record = raw.get(DENOISER_KEY)
    if record is not None and not (
        isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("component", "class", "family"))
    ):
        raise NaRALoadError(f"{where} (field {DENOISER_KEY}) must name the denoiser's component, class and family.")
    configs = {c: _config_from_dict(raw[c], f"{where} [{c}]") for c in COMPONENTS if c in raw}
    return state, configs, record


def _split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in COMPONENTS and rest:
            parts.setdefault(prefix, {})[rest] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise NaRALoadError(f"Keys without a {'./'.join(COMPONENTS)}. prefix: {unknown[:5]}.")
    return parts


def check_fits(model: nn.Module, config: NaRAConfig, state: dict[str, torch.Tensor], component: str) -> None:
    """Raise `NaRALoadError` unless ``state`` (keys without the component prefix) is exactly what an adapter of
    ``config`` on ``model`` holds (the core's fit rule, `adapter_tensor_shapes`)."""
    try:
        expected = adapter_tensor_shapes(model, config)
    except ValueError as err:
        raise NaRALoadError(
            f"The NaRA config of the {component} (field target_modules) does not fit the pipeline's {component}; "
            f"nothing was changed: {err}"
        ) from err
    problems = fit_problems(state, expected, f"this {component}")
    if problems:
        shown = "\n  ".join(problems[:8]) + ("\n  …" if len(problems) > 8 else "")
        raise NaRALoadError(
            f"These NaRA weights do not fit the pipeline's {component} (made for another model, or another "
            f"config?); nothing was changed:\n  {shown}"
        )


def _check_architecture(
    pipe: Any,
    parts: dict[str, dict[str, torch.Tensor]],
    configs: dict[str, NaRAConfig],
    record: Optional[dict[str, str]],
    denoiser_name: str,
    denoiser: nn.Module,
) -> None:
    """Refuse, naming both, an adapter trained for another denoiser architecture than ``pipe``'s."""
    saved = [c for c in DENOISER_COMPONENTS if c in parts or c in configs]
    if record is None and saved:  # a folder from before the record: a UNet adapter, or a state dict with configs
        record = {"component": saved[0], "class": "UNet2DConditionModel" if saved[0] == "unet" else "?"}
        record["family"] = "unet" if saved[0] == "unet" else "?"
    if record is None:
        return
    mine = family_of(denoiser)
    mine_name = mine.name if mine is not None else "custom"
    same = record["family"] == mine_name and (mine is not None or record["class"] == type(denoiser).__name__)
    if record["family"] == "?" and record["component"] == denoiser_name:
        same = True  # a state dict for a transformer: the shape check decides
    if not same or record["component"] != denoiser_name:
        family = FAMILY_BY_NAME.get(record["family"])
        raise NaRALoadError(
            f"This adapter was trained for a {record['class']} ({record['component']}"
            f"{', ' + family.convention if family else ''}), but {type(pipe).__name__}'s denoiser is a "
            f"{type(denoiser).__name__} ({denoiser_name}); load it into a pipeline of the architecture it was "
            "trained for. Nothing was changed."
        )


def _free_name(models: list[nn.Module], wanted: Optional[str]) -> str:
    taken = {n for m in models for n in adapter_names(m)}
    if wanted is not None:
        if wanted in taken:
            raise NaRALoadError(f"An adapter named {wanted!r} is already loaded; choose another adapter_name.")
        return wanted
    name, i = "default", 0
    while name in taken:
        i += 1
        name = f"default_{i}"
    return name


def _load_tensors(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    mapped = {}
    for key, tensor in state.items():
        if key.startswith(ADAPTER_STATE_PREFIX):
            mapped[f"{ADAPTER_STATE_PREFIX}{name}.{key[len(ADAPTER_STATE_PREFIX) :]}"] = tensor
        else:
            stem, _, leaf = key.rpartition(".")
            mapped[f"{stem}.{name}.{leaf}"] = tensor
    result = model.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if f".{name}." in k and "nara_" in k]
    if missing or result.unexpected_keys:
        raise NaRALoadError(f"Loading left NaRA tensors unset {missing[:5]} or unused {result.unexpected_keys[:5]}.")


# -- the mixin ----------------------------------------------------------------------------------------------
class _pipeline_or_class_method:
    """Bind to the instance when called on one, else to the class (``pipe.f()`` and ``Pipeline.f()``)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return types.MethodType(self.fn, obj if obj is not None else objtype)


class NaRALoaderMixin:
    """``load_nara_weights`` / ``save_nara_weights`` / ``unload_nara_weights`` / ``set_nara_scale`` for pipelines.

    Mix it into any diffusers pipeline whose denoiser is a ``unet`` (SDXL, SD 1.5, SD 2.x and their img2img /
    inpainting variants) or a ``transformer`` (SD3 / 3.5, Flux), or give an existing pipeline these methods with
    `enable_nara_loading` (after ``import nara_diffusion`` every pipeline gets them on first use anyway).
    """

    nara_loadable_components = COMPONENTS

    def _nara_components(self) -> dict[str, nn.Module]:
        return {n: m for n in self.nara_loadable_components if (m := getattr(self, n, None)) is not None}

    def load_nara_weights(
        self,
        pretrained_model_name_or_path_or_dict: PathOrDict,
        adapter_name: Optional[str] = None,
        *,
        weight_name: Optional[str] = None,
        timestep_to_noise_level: Optional[TimestepMap] = None,
        configs: Optional[dict[str, NaRAConfig]] = None,
        **hub_kwargs: Any,
    ) -> None:
        """Load NaRA weights into the pipeline's denoiser (``unet`` or ``transformer``) and text encoders and make
        them the active adapter.

        Every tensor is checked against the pipeline's modules before anything changes; on any error (a folder
        trained for another architecture, damaged or misfitting tensors) the pipeline is left as it was. λ is read
        from the denoiser's timestep by the convention recorded in the folder (`nara_diffusion.image.denoisers`).
        A diffusers LoRA already loaded stays loaded and keeps acting (NaRA goes inside its layers).

        Args:
            pretrained_model_name_or_path_or_dict: A folder from `save_nara_weights` (or a training run's
                ``final/``), its weights file, a Hub repo id, or a state dict (with ``configs``).
            adapter_name: Name of the adapter (default ``"default"``, then ``"default_1"``, ...).
            weight_name: File name inside the folder.
            timestep_to_noise_level: The custom timestep → λ map the adapter was trained with, for a denoiser of no
                known family (SD, SDXL, SD3 and Flux need none).
            configs: Configs per component, for a state dict.
            **hub_kwargs: ``subfolder``, ``revision``, ``cache_dir``, ``token``, ``local_files_only``.

        Raises:
            FileNotFoundError: nothing at the path.
            NaRALoadError (a ValueError): damaged file, unknown component, another architecture, or weights that do
                not fit.
        """
        state, configs, record = read_nara_folder(
            pretrained_model_name_or_path_or_dict, configs, weight_name=weight_name, **hub_kwargs
        )
        parts = _split(state)
        models = self._nara_components()
        denoiser_name, denoiser = denoiser_of(self)
        _check_architecture(self, parts, configs, record, denoiser_name, denoiser)
        for component in sorted(set(parts) | set(configs)):
            if component not in parts or component not in configs:
                raise NaRALoadError(
                    f"The adapter has {'a config' if component in configs else 'weights'} for "
                    f"{component} but no {'weights' if component in configs else 'config'}."
                )
            if component not in models:
                raise NaRALoadError(f"The adapter has weights for {component}, which this pipeline lacks.")
        family = family_of(denoiser)
        known_map = family is not None and timestep_to_noise_level is None
        fmap = family.timestep_to_noise_level if known_map else timestep_to_noise_level
        for component, config in configs.items():
            if config.noise_input == "noise_level" and fmap is None:
                raise NaRALoadError(
                    f"The {component} adapter was trained with a custom timestep → λ map (noise_input='noise_level');"
                    " pass the same map as timestep_to_noise_level=."
                )
            if config.noise_input == "timestep" and fmap is not None:
                raise NaRALoadError(
                    f"The {component} adapter reads λ = t/T; it takes no timestep_to_noise_level."
                    if not known_map
                    else f"The {component} adapter reads λ = t/T, but this pipeline's {type(denoiser).__name__} "
                    f"gives λ = σ directly ({family.convention}); it was trained for another denoiser."
                )
            with lora_unwrapped(models[component]):
                check_fits(models[component], config, parts[component], component)
        reads_denoiser = [c for c in parts if c in TEXT_ENCODERS and configs[c].needs_noise_level]
        if reads_denoiser and denoiser_name not in parts and inplace_tuner(denoiser) is None:
            kind = "UNet" if denoiser_name == "unet" else "transformer"
            raise NaRALoadError(
                f"The {' and '.join(reads_denoiser)} adapter is conditioned on the noise level, which the pipeline "
                f"reads from the timestep of a NaRA {kind}; this adapter has no {denoiser_name} part and the "
                f"pipeline's {denoiser_name} carries no NaRA adapter. Load an adapter saved with its {denoiser_name} "
                f"(or first one for the {denoiser_name})."
            )
        if reads_denoiser and (family is None or family.name not in PER_STEP_FAMILIES):
            raise NaRALoadError(
                f"The {' and '.join(reads_denoiser)} adapter is conditioned on the noise level, which needs the prompt "
                f"re-encoded at every step; that is supported for UNet and SD3 pipelines, not {type(self).__name__}. "
                "Train the text encoders with NaRA-C (core='constant'), or load the adapter without them. Nothing was "
                "changed."
            )
        name = _free_name([models[c] for c in parts], adapter_name)
        scheduler = getattr(self, "scheduler", None)
        scheduler_t = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
        trained = configs.get(denoiser_name)
        reads_t = trained is not None and trained.noise_input == "timestep"
        if reads_t and scheduler_t not in (None, trained.num_train_timesteps):
            logger.warning(
                "The adapter was trained with num_train_timesteps=%d but the pipeline's scheduler has %d; "
                "λ = t/%d is used as trained.",
                trained.num_train_timesteps,
                scheduler_t,
                trained.num_train_timesteps,
            )
        touched = [models[c] for c in parts]
        # all or nothing: a failure in any component restores every component (and its tuner) exactly
        with attach_transaction(*touched, *(inplace_tuner(m) for m in touched)):
            for component in parts:
                model, config = models[component], dataclasses.replace(configs[component], inference_mode=True)
                with lora_unwrapped(model):  # a loaded diffusers LoRA wraps the NaRA layers again afterwards
                    inject_nara(model, config, name, timestep_to_noise_level=fmap)
                    _load_tensors(model, parts[component], name)
                inplace_tuner(model).set_adapter(name, inference_mode=True)
            self._sync_prompt_encoding()

    @_pipeline_or_class_method
    def save_nara_weights(
        self_or_cls: Any,
        save_directory: Union[str, Path],
        unet: Optional[nn.Module] = None,
        text_encoder: Optional[nn.Module] = None,
        text_encoder_2: Optional[nn.Module] = None,
        *,
        transformer: Optional[nn.Module] = None,
        text_encoder_3: Optional[nn.Module] = None,
        adapter_name: Optional[str] = None,
        is_main_process: bool = True,
        base_model: Optional[str] = None,
        model_card: Optional[Mapping[str, Any]] = None,
    ) -> Path:
        """Write NaRA weights as ``nara_weights.safetensors`` + ``nara_config.json``, with a model card (``README.md``;
        ``base_model`` and ``model_card`` as in the module-level `save_nara_weights`).

        On a pipeline with no components given, saves every component that carries NaRA; on the class (as in
        training scripts), pass the modules: ``Pipeline.save_nara_weights(path, unet=unet)`` (SD3 / Flux:
        ``transformer=transformer``).
        """
        given = dict(
            unet=unet,
            transformer=transformer,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            text_encoder_3=text_encoder_3,
        )
        if isinstance(self_or_cls, NaRALoaderMixin):
            if all(m is None for m in given.values()):
                carried = {n: m for n, m in self_or_cls._nara_components().items() if inplace_tuner(m) is not None}
                given = {n: carried.get(n) for n in COMPONENTS}
            # the name the pipeline was loaded under, traced to a Hub id (never written as a local path)
            base_model = hub_base_model(base_model, config_name_or_path(self_or_cls))
        return save_nara_weights(
            save_directory,
            **given,
            adapter_name=adapter_name,
            is_main_process=is_main_process,
            base_model=base_model,
            model_card=model_card,
        )

    def unload_nara_weights(self) -> None:
        """Remove every NaRA adapter from the pipeline: its modules compute exactly what they did before (a loaded
        diffusers LoRA stays)."""
        disable_per_step_prompt_encoding(self)
        for model in self._nara_components().values():
            if inplace_tuner(model) is not None:
                with keeping_lora(model):
                    remove_nara(model)

    def unload_lora_weights(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``unload_lora_weights``, leaving the NaRA adapters in place (diffusers alone would strip the
        NaRA layers nested in its LoRA layers while their bookkeeping stayed)."""
        with keeping_nara(*self._nara_components().values()):
            return super().unload_lora_weights(*args, **kwargs)  # type: ignore[misc]

    def set_nara_scale(self, scale: float) -> None:
        """Multiply the low-rank branch of every loaded NaRA adapter by ``scale`` (absolute: 1.0 restores the
        trained strength, 0.0 gives the base model's output)."""
        for model in self._nara_components().values():
            for module in model.modules():
                if isinstance(module, NaRALinear):
                    for name in module.scaling:
                        module.set_scale(name, scale)

    def set_nara_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active NaRA adapter of every component that has it."""
        found = False
        for model in self._nara_components().values():
            if adapter_name in adapter_names(model):
                inplace_tuner(model).set_adapter(adapter_name, inference_mode=True)
                found = True
        if not found:
            raise KeyError(f"No NaRA adapter named {adapter_name!r}; loaded: {self.get_nara_adapters()}.")
        self._sync_prompt_encoding()

    def get_nara_adapters(self) -> dict[str, list[str]]:
        """The NaRA adapters loaded per component, e.g. ``{"unet": ["default"]}``."""
        return {n: names for n, m in self._nara_components().items() if (names := adapter_names(m))}

    def _sync_prompt_encoding(self) -> None:
        text_encoders = [m for n, m in self._nara_components().items() if n in TEXT_ENCODERS]
        if any(needs_noise_level(te) for te in text_encoders):
            enable_per_step_prompt_encoding(self)
        else:
            disable_per_step_prompt_encoding(self)


class NaRAStableDiffusionXLPipeline(NaRALoaderMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with `NaRALoaderMixin`: ``from_pretrained`` it as usual, then
    ``pipe.load_nara_weights(path)``."""


class NaRAStableDiffusionPipeline(NaRALoaderMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.5 / 2.x) with `NaRALoaderMixin`."""


def enable_nara_loading(pipe: Any) -> Any:
    """Give an already built diffusers pipeline the `NaRALoaderMixin` methods, in place; returns it.

    ``pipe = nd.image.enable_nara_loading(StableDiffusionXLPipeline.from_pretrained(...))``. The pipeline's
    class becomes a subclass of its own class with the mixin (same name and module, so ``isinstance`` checks,
    ``save_pretrained`` and ``from_pipe`` behave as before; see `nara_diffusion._compat.add_mixin`). Since
    ``import nara_diffusion`` gives every pipeline the methods (`nara_diffusion._diffusers_hook`), this call is
    only needed to convert a pipeline ahead of time.

    Raises:
        TypeError: the pipeline has neither a ``unet`` nor a ``transformer``.
    """
    if isinstance(pipe, NaRALoaderMixin):
        return pipe
    denoiser_of(pipe)
    return add_mixin(pipe, NaRALoaderMixin)
