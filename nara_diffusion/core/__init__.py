"""The modality-agnostic NaRA core: config, noise levels, the shared adapter, layer, peft tuner, adapter folders."""

from .adapter import NoiseConditionedAdapter
from .config import NaRAConfig
from .layer import NaRALinear
from .noise import NoiseLevelError, noise_level_from_mask, timestep_to_noise_level, validate_noise_level
from .serialization import NaRALoadError, convert_reference_checkpoint, load_nara_model
from .tuner import (
    NaRAModel,
    attach_transaction,
    check_targets,
    get_adapter,
    get_nara_model,
    inject_nara,
    is_nara_model,
    noise_level,
    register_with_peft,
    remove_nara,
)

register_with_peft()

__all__ = [
    "NaRAConfig",
    "NaRALinear",
    "NaRALoadError",
    "NaRAModel",
    "NoiseConditionedAdapter",
    "NoiseLevelError",
    "attach_transaction",
    "check_targets",
    "convert_reference_checkpoint",
    "get_adapter",
    "get_nara_model",
    "inject_nara",
    "is_nara_model",
    "load_nara_model",
    "noise_level",
    "noise_level_from_mask",
    "register_with_peft",
    "remove_nara",
    "timestep_to_noise_level",
    "validate_noise_level",
]
