"""The private torch / diffusers behaviour behind `nara_diffusion._compat`: one test per function, each failing with
the private API and the installed version named, so that an upgrade that breaks one is diagnosed at once."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from builders import generate, tiny_sd_pipeline, tiny_sdxl_pipeline
from diffusers import DiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from torch import nn
from torch.utils.checkpoint import checkpoint

from nara_diffusion._compat import add_mixin, apply_keeping_dtype, in_backward, restore_method, shadow_method
from nara_diffusion.core.hypernet import FourierEmbedding

TORCH = f"torch {torch.__version__}"
DIFFUSERS = f"diffusers {diffusers.__version__}"


# -- in_backward: torch._C._current_graph_task_id ------------------------------------------------------------------
def test_in_backward_is_false_outside_and_true_in_backward_hooks_and_checkpoint_recomputation():
    api = "torch._C._current_graph_task_id"
    assert hasattr(torch._C, "_current_graph_task_id"), f"{TORCH} no longer has {api}: in_backward() is always False"
    assert torch._C._current_graph_task_id() == -1, f"{TORCH}: {api}() is not -1 outside a backward pass"
    assert not in_backward()

    seen: list[bool] = []
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda grad: seen.append(in_backward()))
    y.sum().backward()
    assert seen == [True], f"{TORCH}: {api}() is -1 inside a tensor backward hook"
    assert not in_backward(), f"{TORCH}: {api}() is not -1 again after the backward pass"

    layer = nn.Linear(4, 4)
    for reentrant in (False, True):
        seen = []

        def block(h: torch.Tensor, seen: list[bool] = seen) -> torch.Tensor:
            seen.append(in_backward())
            return torch.tanh(layer(h))

        out = checkpoint(block, torch.randn(2, 4, requires_grad=True), use_reentrant=reentrant)
        out.sum().backward()
        assert seen == [False, True], (
            f"{TORCH}: {api}() during the forward and the recomputation of activation checkpointing "
            f"(use_reentrant={reentrant}) reads {seen}, expected [False, True]; NaRA layers would not find their core "
            "when checkpointing recomputes them"
        )


# -- apply_keeping_dtype: nn.Module._apply ------------------------------------------------------------------------
def test_casting_a_parent_keeps_the_fourier_buffer_float32_and_moves_it_with_the_model():
    api = "nn.Module._apply(fn, recurse) called on every submodule by .to/.half/.bfloat16"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(FourierEmbedding(8, 16.0)))
    fourier = model[1][0]
    frequencies = fourier.W.clone()
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to(dtype=torch.float16)):
        cast(model)
        assert model[0].weight.dtype in (torch.float16, torch.bfloat16), f"{TORCH}: the cast did not reach Linear"
        assert fourier.W.dtype == torch.float32, (
            f"{TORCH}: casting a parent rounded the Fourier buffer to {fourier.W.dtype}; torch no longer routes casts "
            f"through each submodule's overridden _apply ({api})"
        )
        assert torch.equal(fourier.W, frequencies), f"{TORCH}: the Fourier frequencies changed under a cast ({api})"
    assert "W" in dict(fourier.named_buffers()) and "W" in fourier.state_dict(), f"{TORCH}: W is no longer a buffer"

    model.to("meta")
    assert fourier.W.device.type == "meta" and fourier.W.dtype == torch.float32, (
        f"{TORCH}: a device move left the Fourier buffer on {fourier.W.device} ({fourier.W.dtype}); it must follow the "
        f"model and stay float32 ({api})"
    )
    assert model[0].weight.device.type == "meta"

    plain = nn.Module()
    plain.register_buffer("kept", torch.ones(2))
    plain.register_buffer("cast", torch.ones(2))
    assert apply_keeping_dtype(plain, lambda t: t.half(), True, ["kept"]) is plain
    assert plain.kept.dtype == torch.float32 and plain.cast.dtype == torch.float16, f"{TORCH}: {api}"


# -- add_mixin: pipe.__class__ = subclass ---------------------------------------------------------------------------
class _Mixin:
    def mixed_in(self) -> str:
        return "yes"


def test_a_stock_pipeline_with_a_mixin_is_still_its_class_for_diffusers(tmp_path):
    api = "pipe.__class__ = <subclass of its own class, same name>"
    pipe = tiny_sdxl_pipeline()
    assert add_mixin(pipe, _Mixin) is pipe and pipe.mixed_in() == "yes"
    assert isinstance(pipe, StableDiffusionXLPipeline) and type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(add_mixin(tiny_sdxl_pipeline(1), _Mixin)) is type(pipe), "one class per (mixin, pipeline class)"
    assert add_mixin(pipe, _Mixin) is pipe and type(pipe).__mro__.count(_Mixin) == 1

    other = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    assert type(other) is StableDiffusionXLImg2ImgPipeline and other.unet is pipe.unet, (
        f"{DIFFUSERS}: from_pipe no longer builds a stock pipeline sharing the components of a pipeline after {api}"
    )
    back = StableDiffusionXLPipeline.from_pipe(pipe)
    assert type(back) is StableDiffusionXLPipeline and back.text_encoder_2 is pipe.text_encoder_2

    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline", (
        f"{DIFFUSERS}: save_pretrained after {api} writes _class_name={index['_class_name']!r} to model_index.json"
    )
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(reloaded) is StableDiffusionXLPipeline, f"{DIFFUSERS}: the saved pipeline reloads as {type(reloaded)}"


# -- shadow_method / restore_method: pipe.__dict__["encode_prompt"] -------------------------------------------------
@pytest.mark.parametrize("make", [tiny_sdxl_pipeline, tiny_sd_pipeline], ids=["sdxl", "sd"])
def test_the_pipeline_call_goes_through_a_shadowing_encode_prompt(make):
    api = "pipe.__dict__['encode_prompt'] shadowing the method, called by the pipeline's __call__"
    pipe = make()
    original = type(pipe).encode_prompt
    calls: list[tuple] = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return original(pipe, *args, **kwargs)

    expected = generate(pipe, num_inference_steps=1)
    shadow_method(pipe, "encode_prompt", recording)
    assert pipe.encode_prompt is recording
    assert (generate(pipe, num_inference_steps=1) == expected).all()
    assert len(calls) == 1, (
        f"{DIFFUSERS}: {type(pipe).__name__}.__call__ called the shadowing encode_prompt {len(calls)} times, not once "
        f"({api}); NaRA text encoders would not be re-encoded per step"
    )
    restore_method(pipe, "encode_prompt")
    assert pipe.encode_prompt.__func__ is original
    restore_method(pipe, "encode_prompt")  # a no-op when nothing is shadowed
    generate(pipe, num_inference_steps=1)
    assert len(calls) == 1
