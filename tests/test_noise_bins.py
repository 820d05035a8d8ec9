"""One noise-bin rule for the Multi-LoRA baseline: exact in integers, and the one the sampler, the likelihood and the
noise profile all use."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from builders import noise_bins, profile_data, tiny_llada
from hypothesis import given
from hypothesis import strategies as st

from nara_diffusion.text.noise_bins import noise_bin, noise_bin_of_level
from nara_diffusion.text.noise_profile import noise_profile
from nara_diffusion.text.sampler import Denoiser, MaskRatio


def _old_float_rule(t: float, num_bins: int) -> int:
    """The rule `noise_profile` used before: a float ceiling with a tolerance."""
    return min(max(1, math.ceil(t * num_bins - 1e-9)), num_bins)


def _active_bins(model, run) -> list[str]:
    active = []
    handle = model.get_base_model().register_forward_pre_hook(lambda m, a: active.append(model.active_adapter))
    try:
        run()
    finally:
        handle.remove()
    return active


@given(st.integers(1, 200), st.integers(0, 200), st.integers(1, 16))
def test_noise_bin_is_the_bin_whose_interval_holds_the_exact_fraction(total, masked, num_bins):
    masked = min(masked, total)
    lam = Fraction(masked, total)
    index = noise_bin(masked, total, num_bins)
    assert 1 <= index <= num_bins
    if masked:
        assert Fraction(index - 1, num_bins) < lam <= Fraction(index, num_bins)
    else:
        assert index == 1
    tensor = noise_bin(torch.tensor([masked]), torch.tensor([total]), num_bins)
    assert tensor.dtype == torch.long and tensor.tolist() == [index]
    assert MaskRatio(torch.tensor([masked]), torch.tensor([total])).bin(num_bins).tolist() == [index]


def test_float32_division_would_pick_the_bin_above():
    assert math.ceil(float(torch.tensor(3.0) / torch.tensor(5.0)) * 5) == 4  # the trap
    assert noise_bin(3, 5, 5) == 3


def test_a_float_level_at_an_edge_is_read_as_the_edge():
    assert noise_bin_of_level(0.1, 10) == 1  # 0.1 is a hair above 1/10 in binary; the user means 1/10
    assert noise_bin_of_level(0.4, 5) == 2 and noise_bin_of_level(0.6, 5) == 3 and noise_bin_of_level(1.0, 5) == 5
    assert noise_bin_of_level(1e-12, 5) == 1
    assert noise_bin_of_level(0.1 + 0.2, 10) == 3  # 0.30000000000000004
    assert noise_bin_of_level(float(torch.tensor(0.6)), 5) == 3  # float32: 0.6000000238418579
    assert noise_bin_of_level(0.6001, 5) == 4 and noise_bin_of_level(0.5999, 5) == 3  # off the edge: exact


@given(st.integers(1, 16), st.integers(0, 16))
def test_float32_levels_of_exact_fractions_get_the_exact_bin(num_bins, masked):
    for total in (num_bins, 2 * num_bins, 7, 20):
        k = min(masked, total)
        assert noise_bin_of_level(float(torch.tensor(k / total)), num_bins) == noise_bin(k, total, num_bins)


def test_the_old_float_rule_picks_the_bin_above_for_a_float32_level():
    t = float(torch.tensor(0.3))  # 0.30000001192092896: float32's 3/10
    assert _old_float_rule(t, 10) == 4
    assert noise_bin_of_level(t, 10) == 3


def test_the_noise_profile_uses_the_one_bin_rule():
    model = noise_bins(tiny_llada(), [1, 2, 3, 4, 5])
    ts = [0.4, float(torch.tensor(0.6)), 0.6001]
    active = _active_bins(model, lambda: noise_profile(model, profile_data(), ts, batch_size=3))
    assert active == ["noise_bin_2", "noise_bin_3", "noise_bin_4"]  # the old rule: bin 4 for the second t


def test_the_denoiser_uses_the_exact_bin_of_the_mask_ratio():
    model = noise_bins(tiny_llada(), [1, 2, 3, 4, 5])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    positions = torch.ones_like(ids, dtype=torch.bool)

    def run() -> None:
        with Denoiser(model) as denoise:
            denoise(ids, positions, MaskRatio(torch.tensor([3]), torch.tensor([5])))
            denoise(ids, positions, MaskRatio(torch.tensor([7]), torch.tensor([20])))  # 0.35: bin 2

    assert _active_bins(model, run) == ["noise_bin_3", "noise_bin_2"]
