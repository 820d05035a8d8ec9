"""Masked diffusion language models: native LLaDA and Dream, SFT data, the forward process, the SFT objective,
fine-tuning, the sampler and evaluation. (The lm-eval model, `nara_diffusion.text.lm_eval_model`, needs the ``eval``
extra and is imported on its own.)"""

from . import dream, llada
from .data import collate_sft, load_sft_data, tokenize_sft
from .denoiser import Denoiser, MaskRatio
from .dream import DreamConfig, DreamModel
from .finetune import FinetuneConfig, run_finetune
from .likelihood import mc_loglikelihood
from .llada import LLaDAConfig, LLaDAModelLM
from .loading import load_adapter, load_base_model, load_for_inference
from .masking import MaskedBatch, mask_answers
from .noise_bins import noise_bin_count
from .noise_profile import noise_profile, plot_noise_profiles
from .objectives import lift_loss, masked_diffusion_loss, sft_loss
from .sampler import canvas_noise_level, dream_generate, generate
from .scoring import GenerationEval, evaluate_generation, score_answer

__all__ = [
    "Denoiser",
    "DreamConfig",
    "DreamModel",
    "FinetuneConfig",
    "GenerationEval",
    "LLaDAConfig",
    "LLaDAModelLM",
    "MaskRatio",
    "MaskedBatch",
    "canvas_noise_level",
    "collate_sft",
    "dream",
    "dream_generate",
    "evaluate_generation",
    "generate",
    "lift_loss",
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
