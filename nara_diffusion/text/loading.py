"""Loading a masked-diffusion LM with any adapter this package trains: the base model and tokenizer, a NaRA, NaRA-C
or peft LoRA adapter folder, a noise-bin set, or a fully fine-tuned model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..training.config import check_model_path
from . import dream, llada  # noqa: F401  (register the "llada" and "Dream" model types with the Auto classes)
from .noise_bins import load_noise_bins, noise_bin_folders
from .trained_sampling import read_sampling_record, set_trained_sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base_model(name: str, dtype: str = "float32", load_in_4bit: bool = False) -> tuple[nn.Module, Any]:
    """Load a masked-diffusion LM and its tokenizer (local folder or Hub id; LLaDA and Dream need no remote code: the
    family is read from the config's ``model_type``).

    Raises:
        ValueError: the model has no ``mask_token_id`` in its config, i.e. is not a masked-diffusion LM.
        ImportError: ``load_in_4bit`` without bitsandbytes.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    name = check_model_path(name)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "--load_in_4bit needs bitsandbytes (pip install bitsandbytes, on a CUDA machine)."
            ) from err
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForMaskedLM.from_pretrained(name, **kwargs)
    if getattr(model.config, "mask_token_id", None) is None:
        raise ValueError(
            f"{name} has no mask_token_id in its config: it is not a masked-diffusion LM (e.g. LLaDA or Dream), so the "
            "masked-diffusion objective cannot be trained on it."
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def adapter_base_model(path: Union[str, Path]) -> Optional[str]:
    """The ``base_model_name_or_path`` an adapter folder (or noise-bin set) records, if any."""
    folder = Path(path)
    configs = [folder / "adapter_config.json"] + [d / "adapter_config.json" for d in noise_bin_folders(folder)]
    for config in configs:
        if config.is_file():
            return _read_json(config).get("base_model_name_or_path") or None
    return None


def load_adapter(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Put the adapter in ``path`` on ``model``: a NaRA or NaRA-C folder, a peft LoRA folder, or a noise-bin set
    (a folder of ``noise_bin_1 … noise_bin_K`` LoRA folders, as ``finetune.py --adapter multi-lora`` writes).

    The folder's ``sampling.json`` (the generation length it was trained for), if any, goes on the returned model
    (see `trained_sampling`), so that the samplers default to it.

    Raises:
        FileNotFoundError: ``path`` is none of these.
        ValueError: a noise-bin set with a missing bin.
    """
    import peft

    from nara_diffusion.core import load_nara_model

    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        if _read_json(config_file).get("peft_type") == "NARA":
            loaded = load_nara_model(model, folder)
        else:
            loaded = peft.PeftModel.from_pretrained(model, folder)
    else:
        loaded = load_noise_bins(model, folder)
    return set_trained_sampling(loaded, read_sampling_record(folder))


def load_for_inference(
    adapter: Optional[Union[str, Path]] = None, model: Optional[str] = None, dtype: str = "float32"
) -> tuple[nn.Module, Any]:
    """Load a base model (and tokenizer) with an optional adapter, in eval mode.

    Args:
        adapter: An adapter folder or noise-bin set (see `load_adapter`), a fully fine-tuned model folder, or None
            for the bare base model.
        model: The base model (local folder or Hub id). Default: the one the adapter records.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Returns:
        ``(model, tokenizer)``; the tokenizer saved with the adapter wins over the base model's.
    """
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    folder = Path(adapter) if adapter is not None else None
    is_adapter = folder is not None and ((folder / "adapter_config.json").is_file() or noise_bin_folders(folder))
    if folder is not None and not is_adapter:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} is neither an adapter folder (adapter_config.json, or noise_bin_<k>/ sub-folders) nor a "
                "model folder (config.json)."
            )
        base, tokenizer = load_base_model(str(folder), dtype)
        return base.eval(), tokenizer
    name = model or (adapter_base_model(folder) if folder is not None else None)
    if not name:
        raise ValueError("No base model: pass model= (the adapter folder does not record base_model_name_or_path).")
    base, tokenizer = load_base_model(name, dtype)
    if folder is None:
        return base.eval(), tokenizer
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return load_adapter(base, folder).eval(), tokenizer


__all__ = ["DTYPES", "adapter_base_model", "load_adapter", "load_base_model", "load_for_inference"]
