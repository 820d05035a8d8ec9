"""``--push_to_hub``: upload a finished adapter folder to the Hugging Face Hub, with no path of this machine in it.

The local folder is left as it is (its ``adapter_config.json`` may keep a local ``base_model_name_or_path``, and a
DreamBooth ``training_config.json`` the run's folders, which local loading uses); a copy is uploaded in which every
``adapter_config.json`` names the base model by its Hub id, or by null when none is known
(`nara_diffusion.core.model_card.hub_base_model`), and every other JSON value that is a path of this machine is
replaced the same way (a Hub id it traces back to, else null).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from ..core.folders import ADAPTER_CONFIG_NAME
from ..core.model_card import hub_base_model, set_base_model_field


def publishable_copy(
    folder: Union[str, os.PathLike], target: Union[str, os.PathLike], base_model: Optional[str]
) -> Path:
    """Copy ``folder`` to ``target`` with ``base_model_name_or_path`` of every ``adapter_config.json`` in it set to
    the Hub id of ``base_model`` or of the recorded value (a local folder traced to its Hub id), else null."""
    target = Path(shutil.copytree(folder, target))
    for config in target.rglob(ADAPTER_CONFIG_NAME):
        recorded = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        set_base_model_field(config, hub_base_model(base_model, recorded))
    for path in target.rglob("*.json"):
        if path.name != ADAPTER_CONFIG_NAME:
            raw = json.loads(path.read_text(encoding="utf-8"))
            clean = _without_local_paths(raw)
            if clean != raw:
                path.write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return target


def _without_local_paths(value: Any) -> Any:
    """``value`` (parsed JSON) with every string that names a path of this machine replaced by the Hub id it traces
    back to, or None."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and value and (Path(value).expanduser().is_absolute() or Path(value).exists()):
        return hub_base_model(value)
    return value


def push_folder_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: Optional[str] = None,
    *,
    base_model: Optional[str] = None,
    commit_message: str = "Upload NaRA adapter",
    token: Optional[str] = None,
) -> str:
    """Create (or reuse) the Hub model repository ``repo_id`` and upload a publishable copy of ``folder`` to it.

    Args:
        folder: The adapter folder, e.g. ``<output_dir>/final``.
        repo_id: ``owner/name`` or ``name`` (under the logged-in user); default: the run folder's name.
        base_model: The base model's Hub id when the folder records only a local path.
        commit_message: The Hub commit message.
        token: A Hub token (default: the logged-in one, as `huggingface_hub` finds it).

    Returns:
        The repository id the folder went to.
    """
    from huggingface_hub import create_repo, upload_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--push_to_hub: no folder {folder} to upload.")
    name = repo_id or (folder.parent.name if folder.name in ("final", "best") else folder.name)
    repo = create_repo(name, exist_ok=True, token=token).repo_id
    with tempfile.TemporaryDirectory(prefix="nara-push-") as tmp:
        copy = publishable_copy(folder, Path(tmp) / folder.name, base_model)
        upload_folder(repo_id=repo, folder_path=copy, commit_message=commit_message, token=token)
    return repo


__all__ = ["publishable_copy", "push_folder_to_hub"]
