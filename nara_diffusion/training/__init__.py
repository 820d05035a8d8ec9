"""Training machinery shared by the text and image backends."""

from .adapters import ADAPTERS, attach_adapter
from .config import TrainConfig, load_config
from .loop import LR_SCHEDULES, Trainer, TrainResult, build_accelerator, constant_after_warmup, linear_warmup_decay

__all__ = [
    "ADAPTERS",
    "LR_SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "attach_adapter",
    "build_accelerator",
    "constant_after_warmup",
    "linear_warmup_decay",
    "load_config",
]
