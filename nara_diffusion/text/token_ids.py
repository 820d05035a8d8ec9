"""Token ids at the boundary: every id must be in [0, vocab_size) of the model, or the embedding raises an
IndexError that names nothing (or, on a GPU, a device-side assert). `check_token_ids` turns that into a ValueError
that names the ids, their positions and the vocabulary size, at the cost of one min/max reduction and one host read;
the entry points (`generate`, `mc_loglikelihood`, `noise_profile`) run it once per call, the native LLaDA forward
on CPU inputs only (on an accelerator that read would be a host sync per forward)."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Optional, Union

import torch
from torch import nn

from .model_info import unwrap_parallel

_CHECKED: ContextVar[bool] = ContextVar("nara_token_ids_checked", default=False)


def model_vocab_size(model: nn.Module) -> Optional[int]:
    """The number of token ids ``model`` takes: the smaller of ``config.vocab_size`` and its input embedding's rows;
    None when it has neither (then nothing is checked). Data-parallel and ``torch.compile`` wrappers are looked
    through; PEFT and NaRA wrappers forward both."""
    model = unwrap_parallel(model)
    sizes = []
    config_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(config_size, numbers.Integral) and not isinstance(config_size, bool) and config_size > 0:
        sizes.append(int(config_size))
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            rows = getattr(get_embeddings(), "num_embeddings", None)
        except (AttributeError, NotImplementedError):
            rows = None
        if isinstance(rows, int) and rows > 0:
            sizes.append(rows)
    return min(sizes) if sizes else None


def check_token_ids(ids: torch.Tensor, vocab_size: Optional[int], what: str = "input_ids") -> None:
    """Raise a ValueError unless every entry of ``ids`` is an integer in [0, ``vocab_size``).

    One ``aminmax`` reduction and one host sync (call it once per batch or generation, not per step); the offending
    ids and their positions are looked up only when the check fails. ``vocab_size`` None: nothing is checked.
    """
    if vocab_size is None or not torch.is_tensor(ids):
        return
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}.")
    if ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low >= 0 and high < vocab_size:
        return
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    shown = ", ".join(f"{int(ids[tuple(p)])} at {_position(p.tolist())}" for p in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    where = "(row, position)" if ids.dim() == 2 else "position"
    negative = " A negative id is a placeholder (e.g. -100 labels), not a token." if low < 0 else ""
    raise ValueError(
        f"{what} holds token ids outside the model's vocabulary [0, {vocab_size}): {shown}{more}, by {where}. "
        "Were they made by another model's tokenizer? Use the tokenizer saved with this model (all its ids are "
        f"< vocab_size = {vocab_size}).{negative}"
    )


def check_special_ids(vocab_size: Optional[int], **ids: Union[int, Iterable[int], None]) -> None:
    """Raise a ValueError unless each named id (an int, a sequence of ints, or None) is in [0, ``vocab_size``);
    host-side, no device work. Example: ``check_special_ids(V, mask_token_id=mask, banned_tokens=banned)``."""
    if vocab_size is None:
        return
    for name, value in ids.items():
        if value is None:
            continue
        single = isinstance(value, numbers.Integral)
        bad = [int(v) for v in ([value] if single else value) if v is not None and not 0 <= int(v) < vocab_size]
        if bad:
            raise ValueError(
                f"{name} {bad[0] if single else bad} is outside the model's vocabulary [0, {vocab_size}); is it "
                "from another model's tokenizer or config?"
            )


def _position(index: list[int]) -> str:
    return f"({', '.join(map(str, index))})" if len(index) != 1 else str(index[0])


@contextlib.contextmanager
def token_ids_checked() -> Iterator[None]:
    """Inside, the native LLaDA forward skips its own `check_token_ids` (which it runs on CPU inputs only): the
    caller (the sampler, the likelihood estimator, the noise profile) has checked its ids once up front, and what it
    feeds later is those ids, the mask token and the model's own proposals, so a per-step check adds nothing (and
    would fail on a proposal from the padding rows of an embedding larger than ``vocab_size``)."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def token_ids_already_checked() -> bool:
    """True inside `token_ids_checked`."""
    return _CHECKED.get()


__all__ = ["check_special_ids", "check_token_ids", "model_vocab_size", "token_ids_already_checked", "token_ids_checked"]
