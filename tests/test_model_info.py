"""One way to read a (possibly wrapped) model: the inner model, its device, its mask token."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nara_diffusion.text.likelihood import mc_loglikelihood
from nara_diffusion.text.model_info import model_device, resolve_mask_token_id, unwrap_parallel
from nara_diffusion.text.sampler import generate


class DistributedDataParallel(nn.Module):  # matched by name, as torch's is never imported
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class OptimizedModule(nn.Module):  # torch.compile's wrapper keeps the model as ._orig_mod
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module


class NotAWrapper(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_unwrap_parallel_strips_nested_parallel_and_compile_wrappers_only():
    inner = nn.Linear(2, 2)
    assert unwrap_parallel(OptimizedModule(DistributedDataParallel(OptimizedModule(inner)))) is inner
    other = NotAWrapper(inner)
    assert unwrap_parallel(other) is other  # a .module attribute alone is not a data-parallel wrapper


def test_model_device_is_the_first_parameters_and_cpu_without_parameters():
    assert model_device(nn.Linear(2, 2).to(torch.float64)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")


class _NoMask(nn.Module):
    def __init__(self, mask_token_id=None) -> None:
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=mask_token_id, vocab_size=8)
        self.embed = nn.Embedding(8, 4)


def test_resolve_mask_token_id_prefers_the_argument_then_the_config():
    assert resolve_mask_token_id(_NoMask(5)) == 5
    assert resolve_mask_token_id(_NoMask(5), 3) == 3
    assert resolve_mask_token_id(_NoMask(5), 0) == 0  # 0 is a token id, not "unset"
    with pytest.raises(ValueError, match="No mask token"):
        resolve_mask_token_id(_NoMask())


@pytest.mark.parametrize(
    "call",
    [
        lambda m: generate(m, torch.tensor([[1, 2]]), gen_length=2, steps=2),
        lambda m: mc_loglikelihood(m, [1], [2]),
    ],
    ids=["generate", "mc_loglikelihood"],
)
def test_entry_points_name_a_missing_mask_token_alike(call):
    with pytest.raises(ValueError, match="No mask token: pass mask_token_id="):
        call(_NoMask())
