"""Masked diffusion language models: native LLaDA, SFT data, the forward process, the SFT objective, fine-tuning,
the sampler and evaluation. (The lm-eval model, `nara_diffusion.text.lm_eval_model`, needs the ``eval`` extra and is
imported on its own.)"""

from . import llada
from .data import collate_sft, load_sft_data, tokenize_sft
from .evaluation import (
    GenerationEval,
    evaluate_generation,
    load_adapter,
    load_for_inference,
    mc_loglikelihood,
    noise_profile,
    plot_noise_profiles,
    score_answer,
)
from .finetune import FinetuneConfig, load_base_model, run_finetune
from .llada import LLaDAConfig, LLaDAModelLM
from .masking import MaskedBatch, mask_answers
from .objectives import masked_diffusion_loss, sft_loss
from .sampler import Denoiser, MaskRatio, canvas_noise_level, generate, noise_bin_count

__all__ = [
    "Denoiser",
    "FinetuneConfig",
    "GenerationEval",
    "LLaDAConfig",
    "LLaDAModelLM",
    "MaskRatio",
    "MaskedBatch",
    "canvas_noise_level",
    "collate_sft",
    "evaluate_generation",
    "generate",
    "llada",
    "load_adapter",
    "load_base_model",
    "load_for_inference",
    "load_sft_data",
    "mask_answers",
    "masked_diffusion_loss",
    "mc_loglikelihood",
    "noise_bin_count",
    "noise_profile",
    "plot_noise_profiles",
    "run_finetune",
    "score_answer",
    "sft_loss",
    "tokenize_sft",
]
