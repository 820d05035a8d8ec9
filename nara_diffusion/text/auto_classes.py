"""Registering the native model families with transformers' Auto classes, so Hub folders load without remote code."""

from __future__ import annotations

from typing import Any, Optional

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging

logger = logging.get_logger(__name__)


def register_model_type(config_class: type, model_class: type, tokenizer_class: Optional[Any] = None) -> None:
    """Register ``config_class.model_type`` with AutoConfig, AutoModel, AutoModelForMaskedLM (and AutoTokenizer when
    ``tokenizer_class`` is given); safe to run twice (module reload). A model type registered by another library is
    left in place, with a warning."""
    model_type = config_class.model_type
    current = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
    if current is not None and (current.__module__, current.__qualname__) != (
        config_class.__module__,
        config_class.__qualname__,
    ):
        logger.warning(
            f"model_type {model_type!r} is already registered to {current.__module__}.{current.__qualname__}; "
            f"nara_diffusion's {config_class.__name__}/{model_class.__name__} are not registered with the Auto classes."
        )
        return
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForMaskedLM.register(config_class, model_class, exist_ok=True)
    if tokenizer_class is not None:
        AutoTokenizer.register(config_class, tokenizer_class=tokenizer_class, exist_ok=True)


__all__ = ["register_model_type"]
