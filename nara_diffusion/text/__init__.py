"""Masked diffusion language models: native LLaDA, SFT data, the forward process, the SFT objective, fine-tuning."""

from . import llada
from .data import collate_sft, load_sft_data, tokenize_sft
from .finetune import FinetuneConfig, load_base_model, run_finetune
from .llada import LLaDAConfig, LLaDAModelLM
from .masking import MaskedBatch, mask_answers
from .objectives import masked_diffusion_loss, sft_loss

__all__ = [
    "FinetuneConfig",
    "LLaDAConfig",
    "LLaDAModelLM",
    "MaskedBatch",
    "collate_sft",
    "llada",
    "load_base_model",
    "load_sft_data",
    "mask_answers",
    "masked_diffusion_loss",
    "run_finetune",
    "sft_loss",
    "tokenize_sft",
]
