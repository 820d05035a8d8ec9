"""Noise levels at the boundary: validation, timesteps and realised mask ratios."""

from __future__ import annotations

import pytest
import torch

import nara_diffusion as nd


def test_validate_returns_float_vectors():
    assert nd.core.validate_noise_level(0.25).tolist() == [0.25]
    out = nd.core.validate_noise_level(torch.tensor([0, 1]), batch_size=2)
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 1.0]
    assert nd.core.validate_noise_level(torch.tensor(0.5), batch_size=7).shape == (1,)


def test_timestep_to_noise_level():
    out = nd.core.timestep_to_noise_level(torch.tensor([0, 250, 999]), 1000)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.25, 0.999]))
    with pytest.raises(nd.NoiseLevelError, match="timestep"):
        nd.core.timestep_to_noise_level(-1, 1000)


def test_noise_level_from_mask_counts_only_the_region():
    masked = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    region = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(nd.core.noise_level_from_mask(masked), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(nd.core.noise_level_from_mask(masked, region), torch.tensor([1.0, 0.0]))
    with pytest.raises(nd.NoiseLevelError, match="region"):
        nd.core.noise_level_from_mask(masked, region[:, :3])


@pytest.mark.parametrize("bad", [None, True, [[0.1]], torch.tensor([]), torch.tensor([0.5j])])
def test_malformed_values(bad):
    with pytest.raises(nd.NoiseLevelError):
        nd.core.validate_noise_level(bad)
