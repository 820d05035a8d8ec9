"""`NaRAModel`: peft tuner that injects `NaRALinear` layers, owns the shared hypernetwork and routes λ.

How λ travels: a forward pre-hook on the wrapped base model takes the ``noise_level=`` keyword off (or the
value set by `noise_level(model, λ)`), validates it against the batch, and has each active adapter compute
its core once; a forward hook clears it afterwards. Registration makes NaRA a peft method under the type
string ``"NARA"`` so that ``peft.get_peft_model`` and ``PeftModel.from_pretrained`` also work.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

import peft
import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .adapter import NoiseConditionedAdapter
from .config import NARA_PEFT_TYPE, NaRAConfig
from .layer import MERGE_IMPOSSIBLE, NaRALayer, NaRALinear
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


class NaRAModel(BaseTuner):
    """Peft tuner for NaRA: wraps target linear layers in `NaRALinear` and owns one
    `NoiseConditionedAdapter` per adapter name (``nara_hypernet[adapter_name]``), shared by all its layers."""

    prefix: str = "nara_"
    tuner_layer_cls = NaRALayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state: bool = True

    # -- injection ----------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: NaRAConfig, adapter_name: str) -> None:
        self._ensure_hypernet(model, config, adapter_name)

    def _ensure_hypernet(self, model: nn.Module, config: NaRAConfig, adapter_name: str) -> NoiseConditionedAdapter:
        """Create the adapter's shared hypernetwork (once) and the model-level λ hooks (once per model).

        Called from `_pre_injection_hook` for the first adapter and lazily from `_create_and_replace`, because
        ``PeftModel.add_adapter`` injects further adapters without running the injection hooks.
        """
        if "nara_hypernet" not in self._modules:
            self.nara_hypernet = nn.ModuleDict()
            self._pending_noise_level: Optional[NoiseLevelLike] = None
            self.noise_level_fn: Optional[NoiseLevelFn] = None
            self._adapters_enabled = True
            self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        if adapter_name not in self.nara_hypernet:
            hypernet = NoiseConditionedAdapter(config).to(_first_device(model))
            hypernet.requires_grad_(adapter_name in self.active_adapters and not config.inference_mode)
            self.nara_hypernet[adapter_name] = hypernet
        if not self._hook_handles:
            self._hook_handles = [
                model.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
                model.register_forward_hook(self._end_forward, always_call=True),
            ]
        return self.nara_hypernet[adapter_name]

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            # peft forgets the config of an adapter that failed to inject; forget its hypernetwork too
            if "nara_hypernet" in self._modules and adapter_name in self.nara_hypernet:
                del self.nara_hypernet[adapter_name]
            raise

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
        core = self._ensure_hypernet(self.model, config, adapter_name)
        if isinstance(target, NaRALayer):
            target.update_layer(adapter_name, core, config, inference_mode=config.inference_mode)
            return
        new_module = NaRALinear(target, adapter_name, core, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_new_adapter_config(self, config: NaRAConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, NaRAConfig):
            raise TypeError(f"NaRAModel needs a NaRAConfig, got {type(config).__name__}.")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for name, hypernet in self.nara_hypernet.items():
            hypernet.requires_grad_(name in self.active_adapters and not self.peft_config[name].inference_mode)

    # -- λ routing ----------------------------------------------------------------------------------------
    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        value = kwargs.pop("noise_level", None)
        if value is None:
            value = self._pending_noise_level
        if value is None and self.noise_level_fn is not None:
            value = self.noise_level_fn(args, kwargs)
        names = [n for n in self.active_adapters if n in self.nara_hypernet] if self._adapters_enabled else []
        for name in names:
            hypernet, cfg, lam = self.nara_hypernet[name], self.peft_config[name], None
            if value is not None:  # validated even where unused, so a bad value never passes silently
                lam = to_noise_level(
                    value,
                    cfg.noise_input,
                    cfg.num_train_timesteps,
                    batch_size=_batch_size(args, kwargs),
                    device=_first_device(hypernet),
                )
            elif hypernet.needs_noise_level:
                raise NoiseLevelError(
                    "This NaRA model is conditioned on the noise level but was called without one: pass "
                    "noise_level=λ (a float or a [batch] tensor in [0, 1], or a timestep when the config "
                    "says noise_input='timestep'), or wrap the call in `with nd.noise_level(model, λ):`."
                )
            hypernet.begin_forward(lam if hypernet.needs_noise_level else None)
        return args, kwargs

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        for hypernet in self.nara_hypernet.values():
            hypernet.end_forward()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._adapters_enabled = enabled

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for name, hypernet in self.nara_hypernet.items():
            hypernet.requires_grad_(name in self.active_adapters and not inference_mode)

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
        A ``peft.PeftModel`` (or the task-specific subclass named by ``config.task_type``). Call it with
        ``noise_level=λ``: a float or a ``[B]`` tensor.

    Raises:
        ValueError: if ``target_modules`` match nothing in ``model``.
    """
    if not isinstance(config, NaRAConfig):
        raise TypeError(f"get_nara_model needs a NaRAConfig, got {type(config).__name__}.")
    register_with_peft()
    was_training = model.training
    with quiet_peft_wrapping():
        peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    return peft_model.train(was_training)  # new adapter modules (dropout) follow the model's mode


@contextlib.contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Hide the deprecation warning transformers 5 raises when peft probes ``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


_INPLACE_TUNER = "_nara_tuner"


def inject_nara(
    model: nn.Module,
    config: NaRAConfig,
    adapter_name: str = "default",
    noise_level_fn: Optional[NoiseLevelFn] = None,
) -> nn.Module:
    """Attach a NaRA adapter to ``model`` in place and return ``model`` (no PeftModel wrapper).

    This is the shape diffusers users know from ``unet.add_adapter(lora_config)``: the adapted layers and the
    shared hypernetwork (``model.nara_hypernet``) become part of ``model``, so ``model.parameters()``,
    ``model.to(...)`` and ``model.state_dict()`` include them. A second call adds another named adapter.

    Args:
        model: Any torch module whose target layers are ``nn.Linear``.
        config: The adapter configuration.
        adapter_name: Name of the adapter.
        noise_level_fn: Reads the noise level from each call's ``(args, kwargs)`` when the caller passes no
            ``noise_level=`` (e.g. a UNet's ``timestep``); interpreted per ``config.noise_input``.

    Returns:
        ``model``, adapted. `remove_nara` restores it.
    """
    if not isinstance(config, NaRAConfig):
        raise TypeError(f"inject_nara needs a NaRAConfig, got {type(config).__name__}.")
    register_with_peft()
    was_training = model.training
    tuner = model.__dict__.get(_INPLACE_TUNER)
    if tuner is None:
        with quiet_peft_wrapping():
            tuner = NaRAModel(model, config, adapter_name)
        model.__dict__[_INPLACE_TUNER] = tuner
        model.nara_hypernet = tuner.nara_hypernet
    else:
        if adapter_name in tuner.peft_config:
            raise ValueError(f"This model already has a NaRA adapter named {adapter_name!r}.")
        tuner.peft_config[adapter_name] = config
        try:
            tuner.inject_adapter(model, adapter_name)
        except BaseException:
            del tuner.peft_config[adapter_name]
            raise
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
    tuner = model.__dict__.get(_INPLACE_TUNER)
    if isinstance(tuner, NaRAModel):
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
    """The shared `NoiseConditionedAdapter` (hypernetwork) of ``adapter_name`` (default: the active adapter)."""
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
    previous = tuner._pending_noise_level
    tuner._pending_noise_level = value
    try:
        yield
    finally:
        tuner._pending_noise_level = previous
