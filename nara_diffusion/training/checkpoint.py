"""Checkpoint folders written atomically: a crash or a full disk never leaves a half-written checkpoint."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def write_atomically(dst: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh sibling folder, then swap it in for ``dst``.

    If ``write`` raises (e.g. out of disk), ``dst`` keeps its previous content and the partial folder is
    removed. The swap is two renames, so ``dst`` is either the old or the new checkpoint, never a mix.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    old = dst.with_name(f".{dst.name}.old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        tmp.mkdir()
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
