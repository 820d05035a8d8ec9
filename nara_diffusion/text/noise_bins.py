"""The noise-bin (Multi-LoRA) baseline in one place: K peft LoRA adapters named ``noise_bin_1 … noise_bin_K``, the
k-th trained only on noise levels t in its bin ((k−1)/K, k/K], and at inference the adapter of λ's bin.

Which bin a noise level falls in is decided by one rule, `noise_bin`: ⌈λ·K⌉ clamped to [1, K], computed in integers
from λ as an exact fraction ``masked / total`` (the sampler's and the likelihood's mask ratios). Floats pick the wrong
bin at the edges: in float32, 3/5 is 0.6000000238, so ⌈0.6000000238·5⌉ = 4 although λ = 3/5 is the right end of bin
3. A noise level that only exists as a float (the noise profile's t) goes through `noise_bin_of_level`, which reads a
t within float32 rounding of an edge k/K as k/K and places every other t by ⌈t·K⌉.

On disk a trained set is a folder of ``noise_bin_<k>/`` adapter folders (`gather_noise_bins` writes it,
`load_noise_bins` loads it onto a base model).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import peft
import torch
from torch import nn

from ..core.folders import write_atomically
from .masking import DEFAULT_EPS, uniform
from .model_info import unwrap_parallel

NOISE_BIN_PREFIX = "noise_bin_"
_NOISE_BIN_RE = re.compile(rf"^{NOISE_BIN_PREFIX}(\d+)$")
_Count = TypeVar("_Count", int, torch.Tensor)


# -- which bin -----------------------------------------------------------------------------------------------------
def noise_bin(masked: _Count, total: _Count, num_bins: int) -> _Count:
    """The noise bin ⌈(masked / total)·K⌉ clamped to [1, K] of the exact fraction ``masked / total``, in integers.

    Args:
        masked, total: Python ints, or long tensors of one shape (e.g. ``[B]``); ``total`` > 0.
        num_bins: K.

    Returns:
        An int, or a long tensor of the inputs' shape.
    """
    index = (masked * num_bins + total - 1) // total
    if torch.is_tensor(index):
        return index.clamp(1, num_bins)
    return min(max(int(index), 1), num_bins)


def noise_bin_of_level(t: float, num_bins: int) -> int:
    """`noise_bin` of a noise level given as a float: ⌈t·K⌉ clamped to [1, K], except that a t within float32
    rounding of a bin edge k/K is read as k/K, the bin the caller means (``0.1`` of 10 bins, float32's ``0.6`` =
    0.6000000238… of 5, ``linspace``'s 0.30000000000000004 of 10 all land in bin k, not k + 1)."""
    scaled = float(t) * num_bins
    edge = round(scaled)
    if abs(scaled - edge) <= 2 * _FLOAT32_EPS * max(1.0, scaled):
        return noise_bin(edge, num_bins, num_bins)
    return min(max(1, math.ceil(scaled)), num_bins)


_FLOAT32_EPS = 2.0**-23


def noise_bin_bounds(index: int, num_bins: int) -> tuple[float, float]:
    """The noise levels ``((k−1)/K, k/K]`` of bin ``index`` = k (1-based)."""
    return (index - 1) / num_bins, index / num_bins


def sample_t_in_bin(
    batch_size: int,
    index: int,
    num_bins: int,
    *,
    eps: float = DEFAULT_EPS,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str] = "cpu",
) -> torch.Tensor:
    """t ~ U(max(ε, (k−1)/K), k/K) per example: noise levels of bin ``index`` = k (1-based) of K, ``[B]`` float32."""
    low, high = noise_bin_bounds(index, num_bins)
    low = max(eps, low)
    u = uniform((batch_size,), generator, torch.device(device), torch.float64)
    return (low + (high - low) * u).float()


# -- adapter names --------------------------------------------------------------------------------------------------
def noise_bin_name(index: int) -> str:
    """Adapter name of noise bin ``index`` (1-based): ``noise_bin_<index>``."""
    return f"{NOISE_BIN_PREFIX}{index}"


def noise_bin_index(name: str) -> Optional[int]:
    """The bin k of an adapter named ``noise_bin_<k>``, else None."""
    match = _NOISE_BIN_RE.match(name)
    return int(match.group(1)) if match else None


def noise_bin_count(model: nn.Module) -> Optional[int]:
    """K when ``model`` is a peft model carrying the noise-bin adapters ``noise_bin_1 … noise_bin_K``, else None.

    Raises:
        ValueError: some bins are present but the set is incomplete (a missing or a zero bin).
    """
    model = unwrap_parallel(model)
    config = getattr(model, "peft_config", None) if isinstance(model, peft.PeftModel) else None
    if not config:
        return None
    found = {k for name in config if (k := noise_bin_index(name)) is not None}
    if not found:
        return None
    count = max(found)
    missing = sorted(set(range(1, count + 1)) - found)
    if missing or 0 in found:
        raise ValueError(
            f"Incomplete noise-bin adapter set: adapters {sorted(found)} are loaded, so bins 1..{count} are expected "
            f"but {[noise_bin_name(i) for i in (missing or [0])]} "
            f"{'is missing' if missing else 'is not a valid bin'}. Load every bin (noise_bin_1 … noise_bin_K)."
        )
    return count


# -- on disk ----------------------------------------------------------------------------------------------------------
def noise_bin_folders(path: Union[str, Path]) -> list[Path]:
    """The ``noise_bin_<k>`` adapter sub-folders of a noise-bin set, in bin order (empty if ``path`` is not one)."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    found = [d for d in folder.iterdir() if d.is_dir() and noise_bin_index(d.name) is not None]
    found = [d for d in found if (d / "adapter_config.json").is_file()]
    return sorted(found, key=lambda d: noise_bin_index(d.name))


def load_noise_bins(model: nn.Module, path: Union[str, Path]) -> peft.PeftModel:
    """Load the noise-bin set in ``path`` onto ``model``, one peft adapter per bin, named as on disk.

    Raises:
        FileNotFoundError: ``path`` holds no ``noise_bin_<k>/`` adapter folder.
        ValueError: a bin is missing.
    """
    folder = Path(path)
    bins = noise_bin_folders(folder)
    if not bins:
        raise FileNotFoundError(
            f"{folder} holds no adapter: expected adapter_config.json (NaRA or LoRA) or noise_bin_<k>/ sub-folders "
            "(a noise-bin set)."
        )
    numbers = [noise_bin_index(d.name) for d in bins]
    missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    if missing or 0 in numbers:
        raise ValueError(
            f"Incomplete noise-bin set in {folder}: found {[d.name for d in bins]}, missing bins "
            f"{missing or [0]}; every bin 1..K needs its adapter folder."
        )
    peft_model = peft.PeftModel.from_pretrained(model, bins[0], adapter_name=bins[0].name)
    for sub in bins[1:]:
        peft_model.load_adapter(sub, adapter_name=sub.name)
    noise_bin_count(peft_model)
    return peft_model


def gather_noise_bins(folder: Path, sources: Sequence[Path], tokenizer: Any) -> None:
    """Write ``folder/noise_bin_<k>/`` (a copy of bin k's adapter folder ``sources[k-1]``) for every k, plus the
    tokenizer, atomically."""

    def fill(tmp: Path) -> None:
        for index, source in enumerate(sources, start=1):
            shutil.copytree(source, tmp / noise_bin_name(index))
        tokenizer.save_pretrained(tmp)

    write_atomically(folder, fill)


__all__ = [
    "NOISE_BIN_PREFIX",
    "gather_noise_bins",
    "load_noise_bins",
    "noise_bin",
    "noise_bin_bounds",
    "noise_bin_count",
    "noise_bin_folders",
    "noise_bin_index",
    "noise_bin_name",
    "noise_bin_of_level",
    "sample_t_in_bin",
]
