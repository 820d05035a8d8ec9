"""Adapter folders on disk: the file names (each defined once) and the one atomic folder writer of the package.

File names: a peft adapter folder (``model.save_pretrained``) holds `ADAPTER_CONFIG_NAME` + `ADAPTER_WEIGHTS_NAME`; a
diffusers pipeline adapter folder (``pipe.save_nara_weights``) holds `PIPELINE_CONFIG_NAME` + `PIPELINE_WEIGHTS_NAME`;
both carry a model card, `MODEL_CARD_NAME`. The NaRA authors' code writes `REFERENCE_WEIGHTS_NAME` (a pickle, only
ever read by ``nd.convert_reference_checkpoint``).

Writing: every folder the package writes (adapter folders, converted checkpoints, pipeline adapters, the trainer's
``state/``, ``best/`` and ``final/``) goes through `write_atomically`. A save of ``X`` writes every file into
``.X.tmp`` and syncs it, renames it ``.X.new`` (so a ``.X.new`` is always complete), moves the previous ``X`` aside to
``.X.old``, renames ``.X.new`` to ``X`` and deletes ``.X.old``. Every step is a rename or a deletion, so a kill
anywhere leaves one of a few states, and `recover` (run at the start of every save and before a resume) turns each
back into a plain ``X``: it finishes a swap whose new copy is complete, restores ``.X.old`` when ``X`` is missing, and
deletes what is left (half-written ``.X.tmp``, half-deleted ``.X.old``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from peft.utils import CONFIG_NAME as _PEFT_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME as _PEFT_WEIGHTS_NAME

#: The config of a peft adapter folder (``adapter_config.json``, peft's name).
ADAPTER_CONFIG_NAME: str = _PEFT_CONFIG_NAME
#: The weights of a peft adapter folder (``adapter_model.safetensors``, peft's name).
ADAPTER_WEIGHTS_NAME: str = _PEFT_WEIGHTS_NAME
#: The pickled weights the NaRA authors' code writes; read only by the converter, with ``weights_only=True``.
REFERENCE_WEIGHTS_NAME = "adapter_model.bin"
#: The config of a diffusers pipeline adapter folder (per-component `NaRAConfig`s).
PIPELINE_CONFIG_NAME = "nara_config.json"
#: The weights of a diffusers pipeline adapter folder (keys prefixed by component, like diffusers' LoRA file).
PIPELINE_WEIGHTS_NAME = "nara_weights.safetensors"
#: The model card of every adapter folder.
MODEL_CARD_NAME = "README.md"
#: How a text adapter was trained to generate (answer length, padding), for samplers to default to.
SAMPLING_CONFIG_NAME = "sampling.json"

_SUFFIXES = ("tmp", "new", "old")


def _kill_point(name: str, dst: Path) -> None:
    """Test seam, called between the steps of a save of ``dst``; does nothing. Tests make it raise to simulate a kill.

    Points: ``"tmp_written"``, ``"new_complete"``, ``"old_renamed"``, ``"new_renamed"``, ``"removing"`` (after each
    entry a removal deletes), ``"old_removed"``, and the trainer's ``"state_writing"`` (between the files of a state).
    """


def siblings(dst: Path | str) -> tuple[Path, Path, Path]:
    """The hidden ``.X.tmp``, ``.X.new`` and ``.X.old`` folders next to ``X``."""
    dst = Path(dst)
    tmp, new, old = (dst.with_name(f".{dst.name}.{suffix}") for suffix in _SUFFIXES)
    return tmp, new, old


def _remove_tree(path: Path, dst: Path) -> None:
    """Delete ``path`` entry by entry; a kill part way leaves a partial tree, which the next call deletes."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.is_dir():
        return
    for child in sorted(path.iterdir()):
        _remove_tree(child, dst)
        _kill_point("removing", dst)
    path.rmdir()


def _sync(path: Path) -> None:
    """fsync a file or folder (so a power cut after the rename cannot leave an empty file behind it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _sync(Path(folder) / name)
        _sync(Path(folder))


def recover(dst: Path | str) -> Path:
    """Bring ``dst`` back to a complete folder (or to absent, if none was ever completed) after a killed save.

    A complete ``.X.new`` is swapped in (the save had finished writing); otherwise a missing ``X`` gets its
    ``.X.old`` back. Leftovers (``.X.tmp``, ``.X.old``, and those of saves nested inside a save) are deleted.
    Single-writer: call it on one process only. Returns ``dst``.
    """
    dst = Path(dst)
    _, new, old = siblings(dst)
    if new.is_dir():
        if dst.exists():
            _remove_tree(old, dst)
            dst.rename(old)
        new.rename(dst)
    elif not dst.exists() and old.is_dir():
        old.rename(dst)  # ``.X.old`` is only ever a complete ``X`` moved aside while ``X`` is missing
    if dst.parent.is_dir():
        leftover = re.compile(rf"\.+{re.escape(dst.name)}(\.(?:{'|'.join(_SUFFIXES)}))+")
        for path in sorted(dst.parent.iterdir()):
            if path != dst and leftover.fullmatch(path.name):
                _remove_tree(path, dst)
    return dst


def write_atomically(dst: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh hidden sibling folder, then swap it in for ``dst`` (see the module docstring).

    If ``write`` raises (e.g. out of disk), ``dst`` keeps its previous content and the partial folder is removed.
    A kill at any point leaves ``dst`` complete (old or new) or recoverable by `recover`, which the next save, or
    a resume, runs first. The previous ``dst`` is deleted only once the new one is in place.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover(dst)
    tmp, new, old = siblings(dst)
    tmp.mkdir()
    try:
        write(tmp)
        _sync_tree(tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _kill_point("tmp_written", dst)
    tmp.rename(new)
    _sync(dst.parent)
    _kill_point("new_complete", dst)
    if dst.exists():
        dst.rename(old)
        _kill_point("old_renamed", dst)
    new.rename(dst)
    _sync(dst.parent)
    _kill_point("new_renamed", dst)
    _remove_tree(old, dst)
    _kill_point("old_removed", dst)
    return dst
