"""Training machinery shared by the text and image backends."""

from .adapters import ADAPTERS, attach_adapter
from .checkpoint import write_atomically
from .config import TrainConfig, load_config
from .loop import Trainer, TrainResult, linear_warmup_decay

__all__ = [
    "ADAPTERS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "attach_adapter",
    "linear_warmup_decay",
    "load_config",
    "write_atomically",
]
