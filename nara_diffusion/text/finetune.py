"""Masked-diffusion SFT of a LLaDA-style model with NaRA, NaRA-C, LoRA or full fine-tuning: the whole run.

``examples/llada/finetune.py`` is a thin wrapper over `run_finetune`; the same function serves scripts of your own::

    from nara_diffusion.text.finetune import FinetuneConfig, run_finetune
    run_finetune(FinetuneConfig(model="GSAI-ML/LLaDA-8B-Instruct", dataset="math_14k.json", epochs=10))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..training import ADAPTERS, TrainConfig, Trainer, TrainResult, attach_adapter
from . import llada  # noqa: F401  (registers the "llada" model type with the Auto classes)
from .data import collate_sft, load_sft_data
from .masking import DEFAULT_EPS, MASKING_MODES
from .objectives import sft_loss

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FinetuneConfig(TrainConfig):
    """Everything a fine-tuning run needs: the model, the data, the adapter and the `TrainConfig` settings.

    The defaults are the NaRA authors' math14k recipe where it applies (r 32, η 0.1, q/k/v/attn_out,
    max_length 512, lr 1e-4, effective batch 32).
    """

    model: str = "GSAI-ML/LLaDA-8B-Instruct"
    dataset: str = ""
    prompt_column: Optional[str] = None
    answer_column: Optional[str] = None
    input_column: Optional[str] = None
    max_length: int = 512
    val_size: int = 128
    val_seed: int = 42
    adapter: str = "nara"
    r: int = 32
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "attn_out"])
    core_scale: float = 0.1
    lora_dropout: float = 0.05
    scaling: float = 1.0
    masking: str = "uniform"
    mask_eps: float = DEFAULT_EPS
    dtype: str = "float32"
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("No dataset: pass --dataset <file.json|file.jsonl|hub name>.")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}.")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {', '.join(MASKING_MODES)}, got {self.masking!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")


def load_base_model(name: str, dtype: str = "float32", load_in_4bit: bool = False) -> tuple[nn.Module, Any]:
    """Load a masked-diffusion LM and its tokenizer (local folder or Hub id; LLaDA needs no remote code).

    Raises:
        ValueError: the model has no ``mask_token_id`` in its config, i.e. is not a masked-diffusion LM.
        ImportError: ``load_in_4bit`` without bitsandbytes.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

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
            f"{name} has no mask_token_id in its config: it is not a masked-diffusion LM (e.g. LLaDA), so the "
            "masked-diffusion objective cannot be trained on it."
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer


def _masked_diffusion_step(
    model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, *, mask_token_id: int, config: Any
) -> torch.Tensor:
    return sft_loss(
        model,
        batch["input_ids"],
        batch["prompt_lengths"],
        mask_token_id=mask_token_id,
        generator=generator,
        eps=config.mask_eps,
        mode=config.masking,
    ).loss


def _save_with_tokenizer(model: nn.Module, folder: Path, tokenizer: Any) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_finetune(config: FinetuneConfig, model: Optional[nn.Module] = None, tokenizer: Any = None) -> TrainResult:
    """Load the base model and data, attach the adapter and train; returns where the weights were written.

    ``model``/``tokenizer`` may be given directly (then ``config.model`` is not loaded).
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_base_model(config.model, config.dtype, config.load_in_4bit)
    mask_token_id = model.config.mask_token_id
    splits = load_sft_data(
        config.dataset,
        tokenizer,
        max_length=config.max_length,
        prompt_column=config.prompt_column,
        answer_column=config.answer_column,
        input_column=config.input_column,
        val_size=config.val_size,
        seed=config.val_seed,
    )
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    options: dict[str, Union[float, str]] = {}
    if config.adapter.startswith("nara"):
        options["core_scale"] = config.core_scale
    model = attach_adapter(
        model,
        config.adapter,
        r=config.r,
        target_modules=config.target_modules,
        lora_dropout=config.lora_dropout,
        scaling=config.scaling,
        **options,
    )
    trainer = Trainer(
        model,
        config,
        splits.train,
        splits.val,
        collate_sft,
        partial(_masked_diffusion_step, mask_token_id=mask_token_id, config=config),
        save_fn=partial(_save_with_tokenizer, tokenizer=tokenizer),
    )
    if trainer.accelerator.is_main_process and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    logger.info("%d training / %d validation examples", len(splits.train), len(splits.val or []))
    return trainer.train()
