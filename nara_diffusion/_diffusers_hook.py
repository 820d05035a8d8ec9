"""Every diffusers pipeline gets the NaRA loader methods after ``import nara_diffusion``, with no enable call.

`install` (run by ``nara_diffusion/__init__``) adds ``load_nara_weights``, ``save_nara_weights``,
``unload_nara_weights``, ``set_nara_scale``, ``set_nara_adapter`` and ``get_nara_adapters`` to
``diffusers.DiffusionPipeline`` when diffusers' pipeline module is imported (at once if it already is; diffusers
itself is never imported here, `nara_diffusion._compat.when_imported`). So ``DiffusionPipeline.from_pretrained``,
``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``AutoPipelineFor*`` and
``from_pipe`` pipelines all have them. The first call on a pipeline makes it a `NaRALoaderMixin` pipeline in place
(`nara_diffusion.image.enable_nara_loading`: same class name, ``isinstance`` and ``save_pretrained`` unchanged)
and runs the mixin's method; called on a class, ``Pipeline.save_nara_weights(path, transformer=...)`` works as in
training scripts.

It also keeps NaRA through diffusers' LoRA unloading (`nara_diffusion.image.coexistence.keeping_nara`):
``PeftAdapterMixin.unload_lora`` (``pipe.unload_lora_weights()`` on the denoiser, ``model.unload_lora()``) and the
text-encoder unload leave a model's NaRA layers in place.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from ._compat import when_imported
from .core.tuner import inplace_tuner

PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"
PEFT_MODULE = "diffusers.loaders.peft"
LORA_BASE_MODULE = "diffusers.loaders.lora_base"
METHODS = (
    "load_nara_weights",
    "save_nara_weights",
    "unload_nara_weights",
    "set_nara_scale",
    "set_nara_adapter",
    "get_nara_adapters",
)
_MARK = "_nara_keeps_nara"


class _NaRAMethod:
    """A NaRA loader method on ``DiffusionPipeline``: converts the pipeline on first call, then runs the mixin's."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"NaRA's ``{name}`` (nara_diffusion.image.NaRALoaderMixin.{name})."

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        from .image.loaders import NaRALoaderMixin, enable_nara_loading

        if obj is None:
            return NaRALoaderMixin.__dict__[self.name].__get__(None, objtype)

        @functools.wraps(getattr(NaRALoaderMixin, self.name))
        def method(*args: Any, **kwargs: Any) -> Any:
            enable_nara_loading(obj)
            return getattr(obj, self.name)(*args, **kwargs)

        return method


def _add_pipeline_methods(module: ModuleType) -> None:
    pipeline = module.DiffusionPipeline
    for name in METHODS:
        if name not in vars(pipeline):
            setattr(pipeline, name, _NaRAMethod(name))


def _keep_nara_in_model_unload(module: ModuleType) -> None:
    mixin = module.PeftAdapterMixin
    original = mixin.unload_lora
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def unload_lora(self: Any, *args: Any, **kwargs: Any) -> Any:
        if inplace_tuner(self) is None:
            return original(self, *args, **kwargs)
        from .image.coexistence import keeping_nara

        with keeping_nara(self):
            return original(self, *args, **kwargs)

    setattr(unload_lora, _MARK, True)
    mixin.unload_lora = unload_lora


def _keep_nara_in_text_encoder_unload(module: ModuleType) -> None:
    original = getattr(module, "_remove_text_encoder_monkey_patch", None)
    if original is None or getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def remove(text_encoder: Any, *args: Any, **kwargs: Any) -> Any:
        if inplace_tuner(text_encoder) is None:
            return original(text_encoder, *args, **kwargs)
        from .image.coexistence import keeping_nara

        with keeping_nara(text_encoder):
            return original(text_encoder, *args, **kwargs)

    setattr(remove, _MARK, True)
    module._remove_text_encoder_monkey_patch = remove


def install() -> None:
    """Arrange the patches above for when diffusers is imported (idempotent; imports nothing of diffusers)."""
    when_imported(PIPELINE_MODULE, _add_pipeline_methods)
    when_imported(PEFT_MODULE, _keep_nara_in_model_unload)
    when_imported(LORA_BASE_MODULE, _keep_nara_in_text_encoder_unload)
