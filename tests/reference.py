"""Reference values and checks the tests compare against: a float tolerance, the NaRA formula written with plain
tensor ops, the λ a sampler hands the model, and a snapshot of everything an attach may touch."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nara_diffusion.core.layer import NaRALayer
from nara_diffusion.core.noise import ComputedNoiseLevel


def f32_tol(reduction_len: int, magnitude: float = 1.0, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance for comparing two float computations of the same quantity that differ only in rounding: a
    batch vs one example at a time (the GEMM kernel blocks the problem differently), another summation order or
    implementation, another SIMD width (``ATEN_CPU_CAPABILITY``) or thread count. Use ``rtol=0``: the error scales
    with the magnitude of the whole computation, not with each element, so small elements need the same atol.

    Bound: one length-K reduction whose values are of size ≤ M is off by about √K·u·M (u = eps/2; the K roundings
    are independent and add in quadrature, the probabilistic form of Higham's K·u·M worst case, which real data never
    approaches). ``depth`` chained reductions (each matmul, conv, norm, softmax on the longest path; a network with
    normalised layers passes earlier errors on at gain ≈ 1) add theirs the same way, so each result is off by about
    √(depth·K)·u·M, and two results differ by at most about twice that. The tolerance is 4·√(depth·K)·eps·M, i.e.
    four times that difference: room for the tail of the error distribution over many outputs, and for gains a
    little above 1 (it is far below any real bug, which changes results by orders of magnitude more).

    Only the product depth·K, the number of roundings on the path, matters: for reductions of different lengths pass
    their sum as ``reduction_len`` (``depth=1``), or a typical length and their count.

    Args:
        reduction_len: K, the length of the reductions (hidden width, kernel size × channels, sequence length, ...).
        magnitude: M, the size of the values the reductions produce. After a normalisation (LayerNorm, RMSNorm,
            GroupNorm) earlier errors shrink with the values, so for a normalised network M is the output's scale;
            where nothing renormalises (tanh MLPs, perturbed adapter branches, a core C(λ) far from I) it is the
            largest intermediate.
        depth: Chained reductions on the longest path (each matmul, conv, norm, softmax).
        dtype: ``torch.float32`` (eps = 2⁻²³ ≈ 1.19e-7), or ``torch.float64`` / ``torch.bfloat16`` for their eps.
    """
    return 4.0 * math.sqrt(depth * reduction_len) * torch.finfo(dtype).eps * magnitude


def reference_core(hyper: dict[str, torch.Tensor], lam: torch.Tensor, r: int, eta: float) -> torch.Tensor:
    """C(λ) = I + η·reshape(MLP(sin/cos(λ·W))), written with plain tensor ops. ``lam``: [B] → [B, r, r]."""
    proj = lam[:, None] * hyper["W"]  # [B, m/2]
    h = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
    n_linear = len([k for k in hyper if k.startswith("w")])
    for i in range(n_linear):
        h = h @ hyper[f"w{i}"].T + hyper[f"b{i}"]
        if i < n_linear - 1:
            h = h * torch.sigmoid(h)
    return torch.eye(r) + eta * h.view(-1, r, r)


def reference_lowrank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, s: float) -> torch.Tensor:
    """s·B·Cᵀ·A·x per example in column form; ``x``: [B, ..., d_in], ``C``: [B, r, r]."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i].reshape(-1, x.shape[-1]).T  # [d_in, N]
        yi = s * (B @ C[i].T @ A @ xi)  # [d_out, N]
        out.append(yi.T.reshape(*x.shape[1:-1], B.shape[0]))
    return torch.stack(out)


def computed(lam: object) -> torch.Tensor:
    """The values of a λ the library computed itself (a `ComputedNoiseLevel`); fails on any other λ."""
    assert isinstance(lam, ComputedNoiseLevel), type(lam)
    return lam.values


# every hook registry of nn.Module (the with_kwargs / always_called ones included)
HOOK_DICTS = tuple(name for name, value in vars(nn.Module()).items() if "hook" in name and isinstance(value, dict))
assert {"_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"} <= set(
    HOOK_DICTS
)


def state_of(model: nn.Module) -> dict[str, Any]:
    """Everything an attach may touch, comparable with ``==`` (tensors are compared separately)."""
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "types": {name: type(m) for name, m in modules},
        "hooks": {name: {h: dict(getattr(m, h)) for h in HOOK_DICTS} for name, m in modules},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in modules},
        "attributes": {name: sorted(vars(m)) for name, m in modules},
        "adapters": {
            name: (sorted(m.r), sorted(m.scaling), sorted(m.base_scaling), sorted(m.noise_adapters), m.active_adapters)
            for name, m in modules
            if isinstance(m, NaRALayer)
        },
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
    }
