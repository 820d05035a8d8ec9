"""λ at the boundary (trust issue): bad values fail where they are given, one model refuses two concurrent forwards,
and only λ that the library computed itself skips the host check on accelerators."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from builders import TinyNet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import f32_tol

import nara_diffusion as nd
from nara_diffusion.core import noise as noise_module
from nara_diffusion.core.noise import ComputedNoiseLevel


def nara_net(seed: int = 0, noise_input: str = "noise_level") -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = nd.NaRAConfig(
        r=3, target_modules=["layers.0", "layers.1"], init_weights=False, noise_input=noise_input, lora_dropout=0.0
    )
    model = nd.get_nara_model(TinyNet(), cfg).eval()
    with torch.no_grad():  # a non-zero last hypernetwork layer: C(λ) really depends on λ
        nd.get_adapter(model).generator.layers[-1].weight.normal_(0.0, 0.3)
    return model


# -- bad λ fails at the line that gives it -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1, 1.5, torch.tensor([0.2, math.nan])])
def test_noise_level_context_refuses_a_bad_value_on_entry(bad):
    model = nara_net()
    entered = False
    with pytest.raises(nd.NoiseLevelError, match="noise_level"):
        with nd.noise_level(model, bad):
            entered = True
    assert not entered
    model(torch.randn(2, 12), noise_level=0.5)  # nothing was left set


def test_noise_level_context_checks_timesteps_against_the_timestep_range():
    model = nara_net(noise_input="timestep")
    with nd.noise_level(model, 999):  # a timestep, valid for num_train_timesteps=1000
        model(torch.randn(2, 12))
    with pytest.raises(nd.NoiseLevelError, match="timestep"):
        with nd.noise_level(model, 1001):
            pass


def test_a_meta_tensor_is_refused_with_the_librarys_error():
    model = nara_net()
    lam = torch.empty(2, device="meta")
    with pytest.raises(nd.NoiseLevelError, match="meta tensor"):
        nd.core.validate_noise_level(lam)
    with pytest.raises(nd.NoiseLevelError, match="meta tensor"):
        model(torch.randn(2, 12), noise_level=lam)
    with pytest.raises(nd.NoiseLevelError, match="meta tensor"):
        nd.get_adapter(model).core(lam)
    model(torch.randn(2, 12), noise_level=0.3)


# -- two threads -------------------------------------------------------------------------------------------------------
def test_a_concurrent_forward_from_a_second_thread_raises_and_leaves_the_first_intact():
    model = nara_net()
    x = torch.randn(2, 12)
    expected = model(x, noise_level=torch.tensor([0.2, 0.7])).detach()
    inside, release = threading.Event(), threading.Event()

    def pause(module, args):
        if threading.current_thread().name == "first":
            inside.set()
            assert release.wait(timeout=30)

    handle = model.base_model.model.layers[1].register_forward_pre_hook(pause)
    results: dict[str, object] = {}

    def first() -> None:
        try:
            results["first"] = model(x, noise_level=torch.tensor([0.2, 0.7])).detach()
        except BaseException as err:
            results["first"] = err

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert inside.wait(timeout=30)
        with pytest.raises(RuntimeError, match="another thread"):
            model(x, noise_level=torch.tensor([0.9, 0.9]))
    finally:
        release.set()
        thread.join(timeout=30)
        handle.remove()
    assert torch.is_tensor(results["first"]), results["first"]
    assert torch.equal(results["first"], expected)  # the refused call changed nothing in the running one
    assert torch.equal(model(x, noise_level=torch.tensor([0.2, 0.7])), expected)  # and the model is free again


def test_sequential_calls_from_several_threads_are_fine_and_the_context_value_is_per_thread():
    model = nara_net()
    x = torch.randn(2, 12)
    expected = model(x, noise_level=0.4).detach()
    outcome: dict[str, object] = {}

    def other() -> None:
        try:  # the main thread's `noise_level` block does not apply here
            model(x)
            outcome["other"] = "ran with the other thread's value"
        except nd.NoiseLevelError:
            outcome["other"] = "refused"
        outcome["explicit"] = model(x, noise_level=0.4).detach()

    with nd.noise_level(model, 0.4):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=30)
        assert torch.equal(model(x), expected)
    assert outcome["other"] == "refused"
    assert torch.equal(outcome["explicit"], expected)


def test_a_model_copies_after_a_training_forward_and_the_copy_is_independent():
    model = nara_net().train()
    x = torch.randn(2, 12)
    out = model(x, noise_level=0.6)  # keeps its core for the backward: not a graph leaf
    twin = copy.deepcopy(model)
    assert twin.base_model._forward_state is not model.base_model._forward_state
    assert torch.equal(twin(x, noise_level=0.6), out)
    out.sum().backward()  # the original's backward still has its core


def test_a_forward_nested_in_its_own_forward_fails_loudly_instead_of_mixing_cores():
    model = nara_net()
    x = torch.randn(2, 12)
    calls = []

    def nested(module, args, output):
        if not calls:
            calls.append(1)
            model(x, noise_level=0.9)

    handle = model.base_model.model.layers[0].register_forward_hook(nested)
    with pytest.raises(nd.NoiseLevelError, match="outside a forward"):
        model(x, noise_level=0.2)
    handle.remove()
    assert torch.equal(model(x, noise_level=0.2), nara_net()(x, noise_level=0.2))


def test_a_thread_whose_forward_was_interrupted_can_call_the_model_again():
    model = nara_net()
    x = torch.randn(2, 12)
    assert model.base_model._forward_state.claim()  # what a KeyboardInterrupt mid-forward leaves behind
    assert torch.equal(model(x, noise_level=0.3), nara_net()(x, noise_level=0.3))


# -- accelerators: given λ is checked (a Python error), computed λ is not read on the host -----------------------------
def test_computed_noise_levels_are_still_checked_on_the_cpu():
    with pytest.raises(nd.NoiseLevelError):
        nd.core.validate_noise_level(ComputedNoiseLevel(torch.tensor([0.5, 1.5])))
    out = nd.core.validate_noise_level(ComputedNoiseLevel(torch.tensor([0.5, 1.0])), batch_size=2)
    assert out.tolist() == [0.5, 1.0]
    with pytest.raises(nd.NoiseLevelError, match="values but the batch has"):
        nd.core.validate_noise_level(ComputedNoiseLevel(torch.tensor([0.5, 1.0])), batch_size=3)


def test_off_the_cpu_only_computed_levels_skip_the_host_read(monkeypatch):
    """A stand-in for an accelerator tensor: reading its values on the host raises. A computed λ is never read; a
    given λ is (one host read, so that a bad value is a Python exception, not a device-side assert)."""
    device_tensor = torch.tensor([0.5, 2.0])
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("meta")), raising=False)

    def host_read(*args, **kwargs):
        raise AssertionError("host read")

    monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
    noise_module._check_range(device_tensor, 1.0, "noise_level", computed=True)  # no read: returns
    with pytest.raises(AssertionError, match="host read"):
        noise_module._check_range(device_tensor, 1.0, "noise_level", computed=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_bad_noise_level_on_cuda_is_a_python_error_and_the_context_survives():
    model = nara_net().cuda()
    x = torch.randn(2, 12, device="cuda")
    with pytest.raises(nd.NoiseLevelError):
        model(x, noise_level=torch.tensor([0.2, 3.0], device="cuda"))
    with pytest.raises(nd.NoiseLevelError):
        model(x, noise_level=torch.tensor([math.nan, 0.1], device="cuda"))
    out = model(x, noise_level=torch.tensor([0.2, 0.3], device="cuda"))
    torch.cuda.synchronize()  # the CUDA context is still usable
    assert torch.isfinite(out).all()


# -- properties --------------------------------------------------------------------------------------------------------
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_values = st.one_of(
    _floats,
    st.integers(-3, 3),
    st.lists(_floats, min_size=0, max_size=5),
    st.lists(st.lists(_floats, min_size=1, max_size=2), min_size=1, max_size=2),
)
_dtypes = st.sampled_from([None, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_values, dtype=_dtypes, batch=st.one_of(st.none(), st.integers(1, 5)))
def test_validation_either_refuses_or_returns_the_values_in_range(value, dtype, batch):
    given_value = value
    if dtype is not None:
        try:
            given_value = torch.tensor(value, dtype=dtype)
        except (OverflowError, RuntimeError, ValueError):
            return
    try:
        out = nd.core.validate_noise_level(given_value, batch_size=batch)
    except nd.NoiseLevelError:
        return
    reference = torch.as_tensor(given_value, dtype=torch.float32).reshape(-1)
    assert out.dtype == torch.float32 and out.dim() == 1 and out.numel() in (1, batch or out.numel())
    assert torch.equal(out, reference)
    assert bool(torch.isfinite(out).all()) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


_model = nara_net(seed=1)
_x = torch.randn(3, 12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(_floats, st.lists(_floats, min_size=1, max_size=4)))
def test_a_model_call_either_refuses_with_the_librarys_error_or_uses_exactly_the_validated_values(value):
    try:
        lam = nd.core.validate_noise_level(value, batch_size=3)
    except nd.NoiseLevelError:
        with pytest.raises(nd.NoiseLevelError):
            _model(_x, noise_level=value)
        with pytest.raises(nd.NoiseLevelError):
            with nd.noise_level(_model, value):
                _model(_x)
        return
    out = _model(_x, noise_level=value)
    per_row = torch.cat([_model(_x[i : i + 1], noise_level=lam[i if lam.numel() > 1 else 0]) for i in range(3)])
    # A batch of 3 against single rows may take other GEMM kernels: the hypernetwork's 64+256+512-term reductions
    # and the net's 12-term ones may each round differently. A λ given to the wrong row moves the output by ~1e-2.
    scale = max(1.0, float(per_row.detach().abs().max()))
    torch.testing.assert_close(out, per_row, rtol=0, atol=f32_tol(900, magnitude=scale))
