"""The private behaviour of torch and diffusers that nara-diffusion relies on, each behind one small function.

Nothing else in the package touches these internals; `tests/test_compat.py` checks each function against the
installed torch / diffusers and fails loudly, naming the private API and the version, when one of them changes.
Checked with torch 2.13 and diffusers 0.42 (the minimum versions in ``pyproject.toml``).

`in_backward` — ``torch._C._current_graph_task_id()`` (private, torch ≥ 2.0; torch's own ``torch.utils.checkpoint``,
    ``torch.utils.module_tracker`` and FSDP2 read it the same way): ``-1`` outside a backward pass, the id of the
    running graph task inside one (backward hooks, and the forward recomputations of activation checkpointing). NaRA
    layers use it to find the core C(λ) of the forward being recomputed, after that forward has ended. If it changed
    (removed, or no longer ``-1`` outside backward), checkpointed NaRA training would fail with "A NaRA layer ran
    outside a forward pass" or, worse, recompute with a core kept for a backward outside one. If the attribute is
    missing, `in_backward` answers False (checkpointed recomputation then fails with that clear error).

`apply_keeping_dtype` — ``nn.Module._apply(fn, recurse)`` (private, stable since torch 1.x): every ``.to()``,
    ``.half()``, ``.bfloat16()``, ``.float()``, ``.cuda()``, ``.cpu()``, ``.to_empty()`` of any parent reaches each
    submodule through its ``_apply``, so a submodule can override it. The Fourier embedding keeps its frequency
    buffer float32 this way (|W| ~ 16 loses ~1e-2 rad in fp16). If torch stopped calling children's ``_apply`` (or
    changed its signature), casting a model to half precision would round the frequencies, silently shifting every
    NaRA core away from the trained one.

`add_mixin` — assigning ``obj.__class__`` to a subclass of its own class made on the fly, with the same ``__name__``,
    ``__qualname__`` and ``__module__`` (plain Python; what matters is diffusers ≥ 0.42 treating the pipeline as
    before): ``isinstance`` checks still hold, ``save_pretrained`` writes the original class name to
    ``model_index.json`` (diffusers records ``self.__class__.__name__``), ``from_pipe`` builds a stock pipeline from
    the components. If diffusers began keying on the exact type (``type(pipe) is ...``) or the class identity,
    ``nd.image.enable_nara_loading`` would have to return a new pipeline object instead.

`shadow_method` / `restore_method` — an entry in the instance's ``__dict__`` hides a method of its class (plain Python),
    relied on with diffusers ≥ 0.42 pipelines calling ``self.encode_prompt(...)`` from ``__call__``. Per-step prompt
    encoding for NaRA text encoders records the prompt this way. If a pipeline encoded its prompt without going
    through ``self.encode_prompt`` (a module-level helper, ``type(self).encode_prompt``), NaRA text encoders would be
    conditioned on λ = 1 for every step instead of each step's λ (the per-step check then raises, see
    ``image/prompts.py``).

`when_imported` — a ``sys.meta_path`` finder that wraps the loader of one named module to run callbacks right after
    it executes (plain Python import machinery, PEP 451; the pattern of the withdrawn PEP 369 post-import hooks), or
    at once when the module is already imported. ``import nara_diffusion`` uses it to give every diffusers pipeline
    the NaRA loader methods without importing diffusers (`nara_diffusion._diffusers_hook`): it relies on diffusers
    0.42 defining ``DiffusionPipeline`` in ``diffusers.pipelines.pipeline_utils``, the model-level LoRA unload in
    ``diffusers.loaders.peft`` (``PeftAdapterMixin.unload_lora``) and the text-encoder one in
    ``diffusers.loaders.lora_base`` (``_remove_text_encoder_monkey_patch``, looked up at call time). If diffusers
    moved them, pipelines would lack ``load_nara_weights`` until ``nd.image.enable_nara_loading(pipe)`` (a test
    fails naming the module), and an ``unload_lora_weights`` would strip NaRA layers nested in LoRA layers.

Import cost: this module imports torch only; nothing here imports diffusers.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Optional, TypeVar

import torch
from torch import nn

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


# -- torch: are we inside a backward pass? ----------------------------------------------------------------------
def in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes forwards).

    Reads ``torch._C._current_graph_task_id()`` (``-1`` outside backward); False if torch lacks it."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# -- torch: buffers that keep their dtype when the module is cast --------------------------------------------------
def apply_keeping_dtype(
    module: M, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool, names: Iterable[str]
) -> M:
    """``nn.Module._apply(module, fn, recurse)``, except that the buffers ``names`` keep their dtype: they follow
    device moves only. Call it from an ``_apply`` override::

        def _apply(self, fn, recurse=True):
            return apply_keeping_dtype(self, fn, recurse, ["W"])
    """
    kept = {name: module._buffers[name] for name in names}
    nn.Module._apply(module, fn, recurse)
    for name, before in kept.items():
        after = module._buffers[name]
        module._buffers[name] = None if before is None else before.to(device=after.device)
    return module


# -- Python/diffusers: give an existing object a mixin's methods --------------------------------------------------
_MIXED: dict[tuple[type, type], type] = {}


def add_mixin(obj: T, mixin: type) -> T:
    """Make ``obj`` (in place) an instance of ``(mixin, type(obj))``, a subclass of its own class with the same name,
    qualified name and module, made once per (mixin, class); returns ``obj``. A no-op when it already is a ``mixin``.
    """
    if isinstance(obj, mixin):
        return obj
    cls = type(obj)
    key = (mixin, cls)
    if key not in _MIXED:
        _MIXED[key] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    obj.__class__ = _MIXED[key]
    return obj


# -- Python/diffusers: an instance attribute that stands in for a method -------------------------------------------
def shadow_method(obj: Any, name: str, replacement: Callable[..., Any]) -> None:
    """Make ``obj.<name>`` resolve to ``replacement`` for this object only (an entry in its ``__dict__``, which hides
    the class's method; set directly, bypassing a custom ``__setattr__`` such as diffusers pipelines')."""
    obj.__dict__[name] = replacement


def restore_method(obj: Any, name: str) -> None:
    """Undo `shadow_method`: ``obj.<name>`` is its class's method again (no-op when not shadowed)."""
    obj.__dict__.pop(name, None)


# -- Python: run code right after a module is imported -------------------------------------------------------------
_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}


class _AfterExec(importlib.abc.Loader):
    """Wraps a module's loader: executes the module, puts the real loader back, then runs the callbacks."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        for callback in _PENDING.pop(module.__name__, []):
            callback(module)

    def __getattr__(self, name: str) -> Any:  # get_data, get_resource_reader, ... of the real loader
        return getattr(self.loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module with pending callbacks it asks the other finders and wraps the loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _AfterExec(spec.loader)
                return spec
        return None


_FINDER = _PostImportFinder()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once the module ``name`` is imported: now if it already is, else right after its
    code has run (before the importer gets it). Importing nothing itself."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    _PENDING.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
