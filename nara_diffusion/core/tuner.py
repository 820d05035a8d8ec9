"""`NaRAModel`: peft tuner that injects `NaRALinear` layers, owns the shared hypernetwork and routes λ.

How λ travels: a forward pre-hook on the wrapped base model takes the ``noise_level=`` keyword off (or the
value set by `noise_level(model, λ)`), validates it against the batch, and has each active adapter compute
its core once; a forward hook clears it afterwards. Registration makes NaRA a peft method under the type
string ``"NARA"`` so that ``peft.get_peft_model`` and ``PeftModel.from_pretrained`` also work.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional, Union

import peft
import torch
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.constants import DUMMY_TARGET_MODULES
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from .adapter import NoiseConditionedAdapter
from .config import NARA_PEFT_TYPE, NaRAConfig
from .layer import MERGE_IMPOSSIBLE, NaRALayer, NaRALinear
from .model_card import finish_adapter_folder
from .noise import NoiseLevelError, NoiseLevelLike, to_noise_level

#: Default target modules per ``model_type`` when ``target_modules`` is None.
DEFAULT_TARGET_MODULES = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "llada": ["q_proj", "k_proj", "v_proj", "attn_out"],
}

#: Reads the noise level from a model call's ``(args, kwargs)``, e.g. a UNet's ``timestep`` argument.
NoiseLevelFn = Callable[[tuple, dict], Optional[NoiseLevelLike]]

# Keyword names that hold the batch in common model signatures, used to check λ's shape.
_BATCH_KWARGS = ("input_ids", "inputs_embeds", "sample", "hidden_states", "x", "pixel_values")


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    candidates = [a for a in args if torch.is_tensor(a)]
    candidates += [kwargs[k] for k in _BATCH_KWARGS if torch.is_tensor(kwargs.get(k))]
    for tensor in candidates:
        if tensor.dim() > 0:
            return int(tensor.shape[0])
    return None


def _first_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


class ForwardState:
    """Which thread runs a NaRA model's forward, and each thread's `noise_level` value.

    A thread may claim the model again without releasing it (a forward interrupted by ``KeyboardInterrupt`` skips
    the hooks that would release it); another thread may not. Copies and pickles get a fresh, idle state.
    """

    def __init__(self) -> None:
        self.context = threading.local()
        self._lock = threading.Lock()
        self._owner: Optional[int] = None

    def claim(self) -> bool:
        """Enter a forward in the calling thread; False if another thread is inside one."""
        me = threading.get_ident()
        with self._lock:
            if self._owner not in (None, me):
                return False
            self._owner = me
            return True

    def release(self) -> bool:
        """Leave the forward claimed by the calling thread; False if it holds none."""
        with self._lock:
            if self._owner != threading.get_ident():
                return False
            self._owner = None
            return True

    def __reduce__(self) -> tuple:
        return (ForwardState, ())


class NaRAModel(BaseTuner):
    """Peft tuner for NaRA: wraps target linear layers in `NaRALinear` and owns one
    `NoiseConditionedAdapter` per adapter name, shared by all its layers.

    The adapters live in ``self.nara_hypernet[adapter_name]``: the attribute name is part of every saved state-dict
    key (``base_model.nara_hypernet.…``, ``unet.nara_hypernet.…``), so it keeps its historical name for the on-disk
    format; the Python names around it (``noise_adapters`` of a layer, `get_adapter`) follow the class."""

    prefix: str = "nara_"
    tuner_layer_cls = NaRALayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state: bool = True

    # -- injection ----------------------------------------------------------------------------------------
    def _ensure_noise_adapter(self, model: nn.Module, config: NaRAConfig, adapter_name: str) -> NoiseConditionedAdapter:
        """Create the adapter's shared `NoiseConditionedAdapter` (once) and the model-level λ hooks (once per model).

        Called from `inject_adapter` (inside its transaction, after the targets were checked) and, idempotently,
        from `_create_and_replace`.
        """
        if "nara_hypernet" not in self._modules:
            self.nara_hypernet = nn.ModuleDict()
            self._forward_state = ForwardState()
            self.noise_level_fn: Optional[NoiseLevelFn] = None
            self._adapters_enabled = True
            self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        if adapter_name not in self.nara_hypernet:
            noise_adapter = NoiseConditionedAdapter(config).to(_first_device(model))
            noise_adapter.requires_grad_(adapter_name in self.active_adapters and not config.inference_mode)
            self.nara_hypernet[adapter_name] = noise_adapter
        if not self._hook_handles:
            self._hook_handles = [
                model.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
                model.register_forward_hook(self._end_forward, always_call=True),
            ]
        return self.nara_hypernet[adapter_name]

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's injection, all or nothing: the targets are checked before anything is touched (`check_targets`),
        and a failure after that restores the model, its hooks and this tuner exactly (`attach_transaction`).

        Every path in goes through here: ``get_nara_model``, ``inject_nara``, ``PeftModel.add_adapter``,
        ``PeftModel.from_pretrained`` / ``load_adapter`` and ``nd.load_nara_model``.
        """
        config = self.peft_config[adapter_name]
        if not isinstance(config, NaRAConfig):
            raise TypeError(f"NaRAModel needs a NaRAConfig, got {type(config).__name__}.")
        state_dict = kwargs.get("state_dict", args[2] if len(args) > 2 else None)
        check_targets(model, config, state_dict=state_dict)
        with attach_transaction(self, model, configs=[config]):
            self._ensure_noise_adapter(model, config, adapter_name)
            super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _create_and_replace(
        self,
        config: NaRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        noise_adapter = self._ensure_noise_adapter(self.model, config, adapter_name)
        if isinstance(target, NaRALayer):
            target.update_layer(adapter_name, noise_adapter, config, inference_mode=config.inference_mode)
            return
        new_module = NaRALinear(target, adapter_name, noise_adapter, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_new_adapter_config(self, config: NaRAConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, NaRAConfig):
            raise TypeError(f"NaRAModel needs a NaRAConfig, got {type(config).__name__}.")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for name, noise_adapter in self.nara_hypernet.items():
            noise_adapter.requires_grad_(name in self.active_adapters and not self.peft_config[name].inference_mode)

    # -- λ routing ----------------------------------------------------------------------------------------
    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        value = kwargs.pop("noise_level", None)
        if value is None:
            value = self._pending_noise_level
        if value is None and self.noise_level_fn is not None:
            value = self.noise_level_fn(args, kwargs)
        names = [n for n in self.active_adapters if n in self.nara_hypernet] if self._adapters_enabled else []
        lams = []
        for name in names:
            noise_adapter, cfg, lam = self.nara_hypernet[name], self.peft_config[name], None
            if value is not None:  # validated even where unused, so a bad value never passes silently
                lam = to_noise_level(
                    value,
                    cfg.noise_input,
                    cfg.num_train_timesteps,
                    batch_size=_batch_size(args, kwargs),
                    device=noise_adapter.device,
                )
            elif noise_adapter.needs_noise_level:
                raise NoiseLevelError(
                    "This NaRA model is conditioned on the noise level but was called without one: pass "
                    "noise_level=λ (a float or a [batch] tensor in [0, 1], or a timestep when the config "
                    "says noise_input='timestep'), or wrap the call in `with nd.noise_level(model, λ):`."
                )
            lams.append(lam if noise_adapter.needs_noise_level else None)
        self._claim_forward()
        for name, lam in zip(names, lams, strict=True):
            self.nara_hypernet[name].begin_forward(lam)
        return args, kwargs

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Also runs when the forward (or its pre-hook) raised; a call that never claimed the model clears nothing,
        # so a forward refused for running beside another thread's leaves that forward's core in place.
        if self._forward_state.release():
            for noise_adapter in self.nara_hypernet.values():
                noise_adapter.end_forward()

    def _claim_forward(self) -> None:
        """Mark this thread as running the model's forward; refuse a concurrent one from another thread.

        λ and C(λ) are per-model state for the length of one forward, so two threads calling one NaRA model at once
        would read each other's cores. Detecting it costs one lock per forward; run one model per thread instead
        (or a lock around the call), and use DDP rather than ``nn.DataParallel``, whose replicas share this state.
        """
        if not self._forward_state.claim():
            raise RuntimeError(
                "This NaRA model is already running a forward in another thread: the noise level is per-model "
                "state, so concurrent calls would mix their cores. Give each thread its own model (copy.deepcopy) "
                "or serialise the calls with a lock; for multi-GPU use DDP, not nn.DataParallel."
            )

    @property
    def _pending_noise_level(self) -> Optional[NoiseLevelLike]:
        """The value set by `noise_level(model, λ)` in the calling thread (each thread has its own)."""
        return getattr(self._forward_state.context, "value", None)

    @_pending_noise_level.setter
    def _pending_noise_level(self, value: Optional[NoiseLevelLike]) -> None:
        self._forward_state.context.value = value

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._adapters_enabled = enabled

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for name, noise_adapter in self.nara_hypernet.items():
            noise_adapter.requires_grad_(name in self.active_adapters and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.nara_hypernet[adapter_name]

    # -- unloading ----------------------------------------------------------------------------------------
    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(MERGE_IMPOSSIBLE)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge=False, **kwargs)
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        return model

    # -- serialisation: the hypernetwork is saved once, without the adapter name ----------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"nara_hypernet.{adapter_name}."
        if marker in key:
            return key.replace(marker, "nara_hypernet.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


# -- attaching safely: the fit check and the transaction ------------------------------------------------------
def resolve_targets(
    model: nn.Module, config: NaRAConfig, state_dict: Optional[dict[str, torch.Tensor]] = None
) -> dict[str, nn.Module]:
    """The modules of ``model`` an adapter of ``config`` would be attached to, found by peft's own rules; touches
    nothing (``config`` included).

    Mirrors peft's ``BaseTuner.inject_adapter``: the default targets of the ``model_type`` when ``target_modules`` is
    None, ``"all-linear"`` expanded, ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern`` honoured
    (``check_target_module_exists``), modules inside existing adapter layers skipped; given a ``state_dict``, the
    modules its keys name instead.

    Raises:
        ValueError: ``target_modules`` is None and the model type has no default.
    """
    cfg = copy.copy(config)  # peft's helpers rebind target_modules; the caller's config stays as it is
    if cfg.target_modules is None:
        model_config = BaseTuner.get_model_config(model)
        model_type = model_config.get("model_type") if isinstance(model_config, Mapping) else None
        defaults = NaRAModel.target_module_mapping.get(model_type)
        if defaults is None:
            raise ValueError(
                f"Please specify target_modules in the NaRAConfig: there is no default for this model "
                f"({type(model).__name__}, model_type {model_type!r}). Name the nn.Linear layers to adapt, e.g. "
                "target_modules=['q_proj', 'v_proj'], or use 'all-linear'."
            )
        cfg.target_modules = defaults if isinstance(defaults, str) else set(defaults)
    cfg = _maybe_include_all_linear_layers(cfg, model)
    if cfg.target_modules == DUMMY_TARGET_MODULES:
        return {}
    named = list(model.named_modules())
    inside_adapters = tuple(f"{key}." for key, module in named if isinstance(module, BaseTunerLayer))
    from_state = None
    if state_dict is not None:
        from_state = {k.rsplit("." + NaRAModel.prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}
    found: dict[str, nn.Module] = {}
    for key, module in named:
        if not key or (inside_adapters and key.startswith(inside_adapters)):
            continue
        if from_state is not None:
            hit = key.removeprefix("_orig_mod.") in from_state
        else:
            hit = bool(NaRAModel._check_target_module_exists(cfg, key))  # an excluded module is falsy
        if hit:
            found[key] = module
    return found


def _shown_targets(config: NaRAConfig) -> str:
    targets = config.target_modules
    return repr(sorted(targets) if isinstance(targets, (set, tuple)) else targets)


def check_targets(
    model: nn.Module, config: NaRAConfig, state_dict: Optional[dict[str, torch.Tensor]] = None
) -> dict[str, nn.Module]:
    """Check, before anything is touched, that ``config`` selects at least one module of ``model`` and only
    ``nn.Linear`` layers (or NaRA layers, for a further adapter); return the selected modules by name.

    Raises:
        NoMatchingPeftModuleError (a ValueError): the targets match nothing.
        ValueError: some targets are not ``nn.Linear``; the message lists them with their types.
    """
    found = resolve_targets(model, config, state_dict)
    if not found and config.target_modules != DUMMY_TARGET_MODULES:
        notes = "".join(
            f" Note: {name}={getattr(config, name)!r}."
            for name in ("exclude_modules", "layers_to_transform", "layers_pattern")
            if getattr(config, name) is not None
        )
        raise NoMatchingPeftModuleError(
            f"Target modules {_shown_targets(config)} not found in the base model ({type(model).__name__}); nothing "
            f"was changed. Name nn.Linear layers by their name suffix (e.g. 'q_proj'), give a regex matched against "
            f"full module names, or use 'all-linear'.{notes}"
        )
    wrong = [(key, module) for key, module in found.items() if not isinstance(module, (nn.Linear, NaRALayer))]
    if wrong:
        listed = ", ".join(f"{key} ({type(module).__name__})" for key, module in wrong[:12])
        if len(wrong) > 12:
            listed += f", … and {len(wrong) - 12} more"
        raise ValueError(
            f"NaRA adapts torch.nn.Linear layers only, but target_modules={_shown_targets(config)} also select "
            f"{len(wrong)} module(s) of other kinds: {listed}. Remove them from target_modules (name the Linear "
            "layers, or narrow the regex) or list them in exclude_modules; nothing was changed."
        )
    return found


_MISSING = object()
_CONTAINERS = (dict, collections.OrderedDict, list, set)


def _capture(roots: tuple[nn.Module, ...], objects: tuple[Any, ...]) -> Callable[[], None]:
    """Record what attaching may change under ``roots`` (and in ``objects``, e.g. configs); return the undo.

    Per module: its attribute dict (entries added later are removed, rebound ones put back) and, in place, the
    contents of every plain dict / list / set it holds: children, parameters, buffers, every hook registry (the
    ``with_kwargs`` and ``always_called`` ones too), a NaRA layer's per-adapter tables, a tuner's configs and hook
    handles. Per parameter: ``requires_grad``. Tensor data is not copied: attaching never writes into existing
    tensors.
    """
    modules: dict[int, nn.Module] = {}
    for root in roots:
        for module in root.modules():
            modules.setdefault(id(module), module)
    records = []
    for owner in [*modules.values(), *objects]:
        attrs = dict(vars(owner))
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in _CONTAINERS}
        records.append((vars(owner), attrs, contents))
    flags = [(p, p.requires_grad) for m in modules.values() for p in m._parameters.values() if p is not None]

    def restore() -> None:
        for current, attrs, contents in records:
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            for key, saved in contents.items():
                container = attrs[key]
                if isinstance(container, list):
                    container[:] = saved
                else:
                    container.clear()
                    container.update(saved)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)

    return restore


@contextlib.contextmanager
def attach_transaction(*roots: Optional[nn.Module], configs: tuple | list = ()) -> Iterator[None]:
    """Run an attach (or load) all or nothing: if the block raises, every module under ``roots`` and every object in
    ``configs`` is put back exactly as it was (replaced layers, hooks, hypernetworks, added attributes such as
    ``_nara_tuner`` / ``nara_hypernet`` / ``peft_config``, ``requires_grad``), then the error propagates."""
    restore = _capture(tuple(r for r in roots if r is not None), tuple(configs))
    try:
        yield
    except BaseException:
        restore()
        raise


def register_with_peft() -> None:
    """Make ``"NARA"`` a peft method: ``peft.get_peft_model`` / ``PeftModel.from_pretrained`` then work.

    peft's ``register_peft_method`` only accepts members of its closed ``PeftType`` enum, so we add NaRA to the
    same three tables it writes, keyed by the string ``"NARA"`` (``PeftType`` is a ``str`` enum, so lookups by
    string work). Idempotent.
    """
    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(NARA_PEFT_TYPE, NaRAConfig)
    PEFT_TYPE_TO_TUNER_MAPPING.setdefault(NARA_PEFT_TYPE, NaRAModel)
    PEFT_TYPE_TO_PREFIX_MAPPING.setdefault(NARA_PEFT_TYPE, NaRAModel.prefix)


def get_nara_model(model: nn.Module, config: NaRAConfig, adapter_name: str = "default") -> peft.PeftModel:
    """Wrap ``model`` with a NaRA adapter (in place, as ``peft.get_peft_model`` does) and return the PeftModel.

    Args:
        model: Any torch module whose target layers are ``nn.Linear``.
        config: The adapter configuration.
        adapter_name: Name of the adapter.

    Returns:
        A `NaRAPeftModel`, i.e. a ``peft.PeftModel`` (for a ``config.task_type``, a subclass of peft's task class,
        e.g. ``peft.PeftModelForCausalLM``) whose ``save_pretrained`` also writes a model card. Call it with
        ``noise_level=λ``: a float or a ``[B]`` tensor.

    Raises:
        ValueError: ``target_modules`` match nothing in ``model``, or select modules that are not ``nn.Linear``
            (checked before anything is touched; any later failure is rolled back, so ``model`` is unchanged).
    """
    if not isinstance(config, NaRAConfig):
        raise TypeError(f"get_nara_model needs a NaRAConfig, got {type(config).__name__}.")
    register_with_peft()
    was_training = model.training
    with attach_transaction(model, configs=[config]), quiet_peft_wrapping():
        _prepare_like_get_peft_model(model, config, adapter_name)
        peft_model = nara_peft_model_class(config.task_type)(model, config, adapter_name=adapter_name)
    return peft_model.train(was_training)  # new adapter modules (dropout) follow the model's mode


def _prepare_like_get_peft_model(model: nn.Module, config: NaRAConfig, adapter_name: str) -> None:
    """Record the base model's ``name_or_path`` in ``config``, as ``peft.get_peft_model`` does, and warn where peft
    would: a model that already carries adapter layers, a recorded base that changes, an adapter name inside the
    parameter prefix (its weights could not be told apart when loading)."""
    old, new = config.base_model_name_or_path, model.__dict__.get("name_or_path", None) or None
    config.base_model_name_or_path = new
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        warnings.warn("This model already carries adapter layers; call .unload() first to start afresh.", stacklevel=3)
    if old is not None and old != new:
        warnings.warn(f"The config's base_model_name_or_path changes from {old!r} to {new!r}.", stacklevel=3)
    if adapter_name in NaRAModel.prefix:
        warnings.warn(
            f"The adapter name {adapter_name!r} is part of the parameter prefix {NaRAModel.prefix!r}; loading could "
            "confuse its weights. Choose another name.",
            stacklevel=3,
        )


# -- the PeftModel classes of NaRA: peft's, with a publishable save ---------------------------------------------------
class NaRAPeftModelMixin:
    """What NaRA adds to peft's ``PeftModel`` classes: ``save_pretrained`` also writes a model card (README.md) and
    keeps paths of this machine out of the folder (``base_model_name_or_path`` is a Hub id or null)."""

    def save_pretrained(
        self,
        save_directory: str,
        *args: Any,
        base_model: Optional[str] = None,
        model_card: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        """peft's ``save_pretrained`` (same arguments), then `finish_adapter_folder`: the model card and a Hub id
        (never a local path) as the base model.

        Args:
            save_directory: The adapter folder.
            *args, **kwargs: peft's (``safe_serialization``, ``selected_adapters``, ``is_main_process``, ...).
            base_model: The base model's Hub id ``owner/name``, when the model was loaded from a local folder that
                does not record it (it also wins over the recorded one).
            model_card: Training facts for the card, e.g. ``{"data": "…", "steps": 1000, "scores": {"gsm8k": 0.41}}``
                (see `nara_diffusion.core.model_card.write_model_card`).
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        call = inspect.signature(peft.PeftModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        call.apply_defaults()
        if call.arguments["is_main_process"]:
            finish_adapter_folder(
                self, save_directory, call.arguments["selected_adapters"], base_model=base_model, extra=model_card
            )


class NaRAPeftModel(NaRAPeftModelMixin, peft.PeftModel):
    """``peft.PeftModel`` for NaRA adapters (see `NaRAPeftModelMixin`)."""


def _task_class(base: type) -> type:
    name = f"NaRA{base.__name__}"
    cls = type(name, (NaRAPeftModelMixin, base), {"__module__": __name__, "__qualname__": name})
    cls.__doc__ = f"``peft.{base.__name__}`` for NaRA adapters (see `NaRAPeftModelMixin`)."
    globals()[name] = cls  # importable by name, so pickle finds it
    return cls


#: NaRA's PeftModel class per ``task_type`` (peft's task classes with `NaRAPeftModelMixin`).
NARA_PEFT_MODEL_CLASSES: dict[str, type] = {
    task: _task_class(cls) for task, cls in MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()
}


def nara_peft_model_class(task_type: Optional[str]) -> type:
    """The PeftModel class a NaRA adapter with ``task_type`` gets (peft's choice, with `NaRAPeftModelMixin`)."""
    return NARA_PEFT_MODEL_CLASSES.get(task_type, NaRAPeftModel)


@contextlib.contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Hide the deprecation warning transformers 5 raises when peft probes ``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


_INPLACE_TUNER = "_nara_tuner"


def inplace_tuner(model: nn.Module) -> Optional[NaRAModel]:
    """The tuner of a model adapted in place with `inject_nara`, or None. (It lives in the model's ``__dict__``, not
    as a submodule, so that the model's parameters and state dict do not list it twice.)"""
    tuner = model.__dict__.get(_INPLACE_TUNER)
    return tuner if isinstance(tuner, NaRAModel) else None


def inject_nara(
    model: nn.Module,
    config: NaRAConfig,
    adapter_name: str = "default",
    noise_level_fn: Optional[NoiseLevelFn] = None,
) -> nn.Module:
    """Attach a NaRA adapter to ``model`` in place and return ``model`` (no PeftModel wrapper).

    This is the shape diffusers users know from ``unet.add_adapter(lora_config)``: the adapted layers and the
    shared `NoiseConditionedAdapter` (``model.nara_hypernet[adapter_name]``) become part of ``model``, so
    ``model.parameters()``, ``model.to(...)`` and ``model.state_dict()`` include them. A second call adds another
    named adapter. For diffusers UNets and CLIP text encoders, ``nd.image.inject_nara`` is this call with the image
    defaults filled in (targets, T from the scheduler, the timestep reader as ``noise_level_fn``).

    Args:
        model: Any torch module whose target layers are ``nn.Linear``.
        config: The adapter configuration.
        adapter_name: Name of the adapter.
        noise_level_fn: Reads the noise level from each call's ``(args, kwargs)`` when the caller passes no
            ``noise_level=`` (e.g. a UNet's ``timestep``); interpreted per ``config.noise_input``.

    Returns:
        ``model``, adapted. `remove_nara` restores it.

    Raises:
        ValueError: ``adapter_name`` is taken, or ``target_modules`` match nothing or select modules that are not
            ``nn.Linear``; checked before anything is touched. Any failure leaves ``model`` exactly as it was.
    """
    if not isinstance(config, NaRAConfig):
        raise TypeError(f"inject_nara needs a NaRAConfig, got {type(config).__name__}.")
    register_with_peft()
    was_training = model.training
    tuner = model.__dict__.get(_INPLACE_TUNER)
    if tuner is not None and adapter_name in tuner.peft_config:
        raise ValueError(f"This model already has a NaRA adapter named {adapter_name!r}.")
    with attach_transaction(model, tuner, configs=[config]):  # a failure leaves model (and its tuner) as they were
        if tuner is None:
            with quiet_peft_wrapping():
                tuner = NaRAModel(model, config, adapter_name)
            model.__dict__[_INPLACE_TUNER] = tuner
            model.nara_hypernet = tuner.nara_hypernet
        else:
            tuner.peft_config[adapter_name] = config
            tuner.inject_adapter(model, adapter_name)
        if noise_level_fn is not None:
            tuner.noise_level_fn = noise_level_fn
    return model.train(was_training)


def remove_nara(model: nn.Module) -> nn.Module:
    """Undo `inject_nara`: the original layers come back, the hypernetwork and the hooks go. Returns ``model``."""
    tuner = model.__dict__.get(_INPLACE_TUNER)
    if tuner is None:
        raise ValueError("This model carries no NaRA adapter attached with inject_nara.")
    tuner.unload()
    del model.nara_hypernet
    del model.__dict__[_INPLACE_TUNER]
    return model


def find_nara_tuner(model: nn.Module) -> NaRAModel:
    """The `NaRAModel` inside a PeftModel (or the tuner itself)."""
    if isinstance(model, NaRAModel):
        return model
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, NaRAModel):
        return tuner
    tuner = inplace_tuner(model)
    if tuner is not None:
        return tuner
    raise TypeError(
        f"{type(model).__name__} carries no NaRA adapter; create one with nd.get_nara_model(model, config) "
        "or load one with nd.load_nara_model(model, path)."
    )


def is_nara_model(model: nn.Module) -> bool:
    """True when ``model`` carries NaRA (a PeftModel from `get_nara_model`, the tuner, or a model adapted in place
    with `inject_nara`), also inside DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        try:
            find_nara_tuner(model)
            return True
        except TypeError:
            inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
            if not isinstance(inner, nn.Module):
                return False
            model = inner


def get_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> NoiseConditionedAdapter:
    """The shared `NoiseConditionedAdapter` of ``adapter_name`` (default: the active adapter); ``.core(λ)`` gives
    C(λ), ``[B, r, r]``."""
    tuner = find_nara_tuner(model)
    name = adapter_name if adapter_name is not None else tuner.active_adapters[0]
    if name not in tuner.nara_hypernet:
        raise KeyError(f"No NaRA adapter named {name!r}; available: {list(tuner.nara_hypernet)}.")
    return tuner.nara_hypernet[name]


@contextlib.contextmanager
def noise_level(model: nn.Module, value: NoiseLevelLike) -> Iterator[None]:
    """Condition every forward of ``model`` inside the block on ``value`` (a float or ``[B]`` tensor).

    For code that calls the model without a ``noise_level=`` keyword (e.g. a generic ``generate`` loop). An
    explicit keyword still wins. Blocks nest; the outer value is restored on exit.
    """
    tuner = find_nara_tuner(model)
    if value is None:
        raise NoiseLevelError("noise_level(model, value) needs a value; got None.")
    for name in tuner.active_adapters:  # fail here, at the line that set the value, not at the first forward
        if name in tuner.peft_config:
            cfg = tuner.peft_config[name]
            to_noise_level(value, cfg.noise_input, cfg.num_train_timesteps)
    previous = tuner._pending_noise_level
    tuner._pending_noise_level = value
    try:
        yield
    finally:
        tuner._pending_noise_level = previous


def precompute_cores(model: nn.Module, noise_levels: torch.Tensor) -> int:
    """Inside `memoized_cores`: compute the cores of every value of ``noise_levels`` ``[N]`` (as a caller would pass
    them as ``noise_level=``) in one hypernetwork run per active adapter, ahead of the forwards that will use them
    (`NoiseConditionedAdapter.precompute_cores`). Returns how many cores were computed; 0 outside the context."""
    tuner = find_nara_tuner(model)
    computed = 0
    for name in tuner.active_adapters:
        if name in tuner.nara_hypernet:
            cfg, noise_adapter = tuner.peft_config[name], tuner.nara_hypernet[name]
            lam = to_noise_level(noise_levels, cfg.noise_input, cfg.num_train_timesteps, device=noise_adapter.device)
            computed += noise_adapter.precompute_cores(lam)
    return computed


@contextlib.contextmanager
def memoized_cores(model: nn.Module) -> Iterator[None]:
    """Memoise C(λ) by value in every NaRA adapter of ``model`` inside the block: exact, and effective under
    ``torch.no_grad()`` in eval mode, e.g. while sampling (`NoiseConditionedAdapter.memoized_cores`)."""
    with contextlib.ExitStack() as stack:
        for noise_adapter in find_nara_tuner(model).nara_hypernet.values():
            stack.enter_context(noise_adapter.memoized_cores())
        yield
