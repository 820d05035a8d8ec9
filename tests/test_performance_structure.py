"""Structural reasons why NaRA costs what LoRA costs (issue 8). No timings: these count calls and ops.

1. C(λ) is computed once per forward, however many layers are adapted: the hypernetwork runs once per model call
   (training forward, backward, activation-checkpointing recomputation, a UNet call under classifier-free guidance)
   and every adapted layer reads that one core.
2. The per-layer cost of NaRA over LoRA is one matmul: for ``[B, L, d]`` activations a NaRA layer dispatches exactly
   the ops of a peft LoRA layer plus one ``bmm`` (per-example cores) or one matmul against an ``[r, r]`` core that is
   not re-indexed in every layer (a core shared by the batch); no reshapes, views or casts on top.
3. No device-to-host synchronisation on the hot path. What runs per forward once λ is known: the λ of each row from
   the sampler's canvas, the hypernetwork (C(λ)), and every adapted layer. On CPU this is checked by construction:
   the Python entry points of a synchronisation (``Tensor.item``, ``tolist``, ``__bool__``, ``__int__``,
   ``__float__``, ``__index__``, ``numpy``) raise while that code runs. The λ *validation* at the model boundary is
   not part of this: λ given by a caller is read once on the host on purpose (a clear Python error for NaN or
   out-of-range λ, also on a GPU); λ the library computes (`ComputedNoiseLevel`: the sampler's canvas, training's t)
   is not range-checked off the CPU, and with CUDA such a whole forward, validation included, runs under
   ``torch.cuda.set_sync_debug_mode("error")`` (skipped without a GPU).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import peft
import pytest
import torch
from builders import tiny_llada_config
from reference import f32_tol
from torch.utils._python_dispatch import TorchDispatchMode

import nara_diffusion as nd
from nara_diffusion.core import layer as layer_module
from nara_diffusion.core.hypernet import CoreGenerator
from nara_diffusion.core.noise import ComputedNoiseLevel, validate_noise_level
from nara_diffusion.text.llada import LLaDAModelLM
from nara_diffusion.text.sampler import canvas_noise_level

TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out"]
LAYERS = 6  # 6 blocks × 4 targets = 24 adapted layers


def tiny_llada(seed: int = 0) -> LLaDAModelLM:
    torch.manual_seed(seed)
    config = tiny_llada_config(
        n_layers=LAYERS, mlp_hidden_size=48, vocab_size=64, embedding_size=64, rope_theta=500000.0, mask_token_id=63,
        pad_token_id=1,
    )  # fmt: skip
    return LLaDAModelLM(config)


def nara_llada(r: int = 4) -> peft.PeftModel:
    model = nd.get_nara_model(tiny_llada(), nd.NaRAConfig(r=r, target_modules=TARGETS, init_weights=False))
    with torch.no_grad():  # a non-zero last hypernetwork layer: C(λ) really depends on λ
        nd.get_adapter(model).generator.layers[-1].weight.normal_(0.0, 0.1)
    return model


@contextlib.contextmanager
def count_hypernet_calls(model: torch.nn.Module) -> Iterator[list[int]]:
    calls = [0]
    generator = nd.get_adapter(model).generator
    assert isinstance(generator, CoreGenerator)
    handle = generator.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def record_cores(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Tensor]]:
    """Every core an adapted layer multiplies by (the layers call `apply_core`)."""
    seen: list[torch.Tensor] = []
    original = layer_module.apply_core

    def spy(h: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        seen.append(core)
        return original(h, core)

    monkeypatch.setattr(layer_module, "apply_core", spy)
    yield seen


# -- 1. C once per forward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [torch.tensor([0.1, 0.5, 0.9]), 0.4], ids=["per-example", "scalar"])
def test_core_is_computed_once_per_forward_for_all_adapted_layers(lam, monkeypatch):
    model = nara_llada().train()
    ids = torch.randint(0, 63, (3, 10))
    n_layers = sum(isinstance(m, layer_module.NaRALinear) for m in model.modules())
    assert n_layers == 4 * LAYERS
    with count_hypernet_calls(model) as calls, record_cores(monkeypatch) as cores:
        logits = model(ids, noise_level=lam).logits
        assert calls[0] == 1
        assert len(cores) == n_layers and all(c is cores[0] for c in cores)  # one tensor, read by every layer
        logits.float().pow(2).mean().backward()
        assert calls[0] == 1  # backward reuses the forward's core
    grads = [p.grad for p in nd.get_adapter(model).parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_core_is_not_recomputed_by_activation_checkpointing(monkeypatch):
    model = nara_llada().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 63, (2, 8))
    with count_hypernet_calls(model) as calls, record_cores(monkeypatch) as cores:
        model(ids, noise_level=torch.tensor([0.2, 0.7])).logits.float().pow(2).mean().backward()
    assert calls[0] == 1
    assert len(cores) == 2 * 4 * LAYERS  # forward, then recomputation in backward: the same core both times
    assert all(c is cores[0] for c in cores)


def test_a_unet_call_under_classifier_free_guidance_computes_one_core():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    ).eval()  # fmt: skip
    nd.image.inject_nara(unet, nd.NaRAConfig(r=4), num_train_timesteps=1000)
    n_layers = sum(isinstance(m, layer_module.NaRALinear) for m in unet.modules())
    assert n_layers >= 16
    with count_hypernet_calls(unet) as calls, torch.no_grad():
        unet(torch.randn(4, 4, 8, 8), torch.tensor(500), encoder_hidden_states=torch.randn(4, 7, 32))  # [uncond; cond]
        assert calls[0] == 1
        unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), encoder_hidden_states=torch.randn(2, 7, 32))
        assert calls[0] == 2


# -- 2. one extra op per layer --------------------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _layer_ops(layer: torch.nn.Module, x: torch.Tensor) -> Counter[str]:
    with torch.no_grad(), OpCounter() as counter:
        layer(x)
    return counter.ops


@pytest.mark.parametrize("per_example", [True, False], ids=["per-example core", "shared core"])
def test_a_nara_layer_runs_the_ops_of_a_lora_layer_plus_one_matmul(per_example):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 24))
    lora = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(16, 24)), peft.LoraConfig(r=4, target_modules=["0"], lora_dropout=0.0)
    )
    nara = nd.get_nara_model(base, nd.NaRAConfig(r=4, target_modules=["0"], lora_dropout=0.0))
    x = torch.randn(3, 5, 16)
    lora_ops = _layer_ops(lora.base_model.model[0], x)
    hypernet = nd.get_adapter(nara)
    lam = torch.tensor([0.1, 0.5, 0.9]) if per_example else torch.tensor([0.3])
    hypernet.begin_forward(lam)
    try:
        assert hypernet.current_core.dim() == (3 if per_example else 2)  # a shared core is stored as [r, r]
        nara_ops = _layer_ops(nara.base_model.model[0], x)
    finally:
        hypernet.end_forward()
    extra = nara_ops - lora_ops
    # s = 1 here (NaRA's default scaling): NaRA skips the exact × 1.0 that peft's LoRA runs, and nothing else
    assert lora_ops - nara_ops == Counter({"mul.Tensor": 1}), f"LoRA runs ops NaRA does not: {lora_ops - nara_ops}"
    if per_example:
        assert extra == Counter({"bmm.default": 1}), extra
    else:
        # h @ C with h [B, L, r] and C [r, r]: matmul folds the batch into one mm (a view in, a view out)
        assert set(extra) <= {"mm.default", "view.default", "_unsafe_view.default"} and extra["mm.default"] == 1, extra
        assert "select.int" not in nara_ops


# -- 3. no device-to-host synchronisation ---------------------------------------------------------------------------
_SYNC_ENTRY_POINTS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@contextlib.contextmanager
def host_syncs_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every Python entry point that reads a tensor's value on the host raises inside the block."""
    with monkeypatch.context() as m:
        for name in _SYNC_ENTRY_POINTS:

            def forbidden(*args, _name=name, **kwargs):
                raise AssertionError(f"host synchronisation on the hot path: Tensor.{_name}")

            m.setattr(torch.Tensor, name, forbidden)
        yield


def test_the_forbidding_context_catches_host_reads(monkeypatch):
    t = torch.tensor([1.0])
    with host_syncs_forbidden(monkeypatch):
        for read in (lambda: t.item(), lambda: bool(t), lambda: t.tolist(), lambda: float(t), lambda: [0, 1][t.long()]):
            with pytest.raises(AssertionError, match="host synchronisation"):
                read()
    assert bool(t)  # restored


@pytest.mark.parametrize("lam", [torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.6])], ids=["per-example", "scalar"])
def test_no_host_sync_from_canvas_to_adapted_layers(lam, monkeypatch):
    """λ from the canvas, C(λ), and the forward of every adapted layer, in training (with backward) and sampling."""
    model = nara_llada().train()
    hypernet = nd.get_adapter(model)
    layers = [m for m in model.modules() if isinstance(m, layer_module.NaRALinear)]
    x = torch.randn(3, 10, 32)
    canvas = torch.randint(0, 63, (3, 12))
    canvas[:, 6:] = 63
    valid = validate_noise_level(lam, batch_size=3)  # the boundary check, outside the hot path (see docstring)
    with host_syncs_forbidden(monkeypatch):
        noise = canvas_noise_level(canvas, "generation", mask_token_id=63, gen_start=4, block=(4, 8))
        noise.value()
        noise = canvas_noise_level(canvas, "sequence", mask_token_id=63, gen_start=4, block=(4, 8), valid=canvas > 0)
        noise.value()
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                hypernet.begin_forward(valid)
                try:
                    out = sum(layer(x).sum() for layer in layers)
                finally:
                    hypernet.end_forward()
                if grad:
                    out.backward()
    assert all(p.grad is not None for p in hypernet.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (set_sync_debug_mode)")
def test_no_host_sync_in_a_cuda_forward_with_validation():
    model = nara_llada().cuda().eval()
    ids = torch.randint(0, 63, (3, 10), device="cuda")
    lam = ComputedNoiseLevel(torch.tensor([0.1, 0.5, 0.9], device="cuda"))
    model(ids, noise_level=lam)  # warm-up (lazy CUDA init, caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(ids, noise_level=lam)  # λ's shape check, C(λ), every adapted layer
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- 4. the loss path's memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1 << 25, 5 * 7], ids=["one chunk", "chunks of 5 rows"])
def test_token_cross_entropy_matches_cross_entropy_in_value_and_gradient(chunk, monkeypatch):
    from nara_diffusion.text import objectives

    monkeypatch.setattr(objectives, "CE_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    logits = (3 * torch.randn(23, 7, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 7, (23,))
    weights = torch.rand(23, dtype=torch.float64)
    ours = objectives.token_cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref * weights.float()).sum(), logits)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref)
    # two float32 implementations of softmax(l) − onehot (values ≤ 1): a log-sum-exp and a softmax over V = 7
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=f32_tol(7, magnitude=1.0, depth=2))
    empty = torch.zeros(0, 7, requires_grad=True)
    objectives.token_cross_entropy(empty, torch.zeros(0, dtype=torch.long)).sum().backward()
    assert empty.grad.shape == (0, 7)


def test_the_loss_saves_one_logits_sized_tensor_in_the_logits_dtype():
    """The float32 log-probabilities (and their float32 gradient) are not kept: for bf16 logits the loss saves one
    [N, V] bf16 tensor, half the bytes of the float32 log-softmax ``F.cross_entropy(logits.float())`` saves."""
    from nara_diffusion.text.objectives import masked_diffusion_loss

    logits = torch.randn(5, 11, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 11, (2, 4))
    masked = torch.tensor([[True, False, True, True], [False, True, True, False]])
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.5, 0.8]), torch.tensor([4, 4]))
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].shape == logits.shape
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
