"""nara-diffusion: noise-aware low-rank adapters (NaRA) for diffusion models, the peft way.

```python
import nara_diffusion as nd
model = nd.get_nara_model(base, nd.NaRAConfig(r=32, target_modules=["q_proj", "v_proj"]))
logits = model(input_ids, noise_level=lam).logits   # lam: float or [B] tensor in [0, 1]
```

The top level holds the modality-agnostic API (`__all__`); the backends are namespaces, imported on first use so
that ``import nara_diffusion`` stays light: `nd.text` (masked diffusion LMs), `nd.image` (diffusers; imports
diffusers), `nd.training` (the accelerate loop), `nd.selection` (DiffoRA). Everything else of the core is in
`nd.core`.
"""

import importlib
from typing import Any

from . import core
from ._diffusers_hook import install as _install_diffusers_hook
from .core import (
    NaRAConfig,
    NaRALoadError,
    NoiseConditionedAdapter,
    NoiseLevelError,
    convert_reference_checkpoint,
    get_adapter,
    get_nara_model,
    inject_nara,
    is_nara_model,
    load_nara_model,
    noise_level,
    remove_nara,
)

__version__ = "0.1.0"

# every diffusers pipeline gets load_nara_weights & co. once diffusers is imported (diffusers is not imported here)
_install_diffusers_hook()

#: The backends, imported by `__getattr__` on first access (``nd.text``, ``nd.image``, ...).
_LAZY_SUBMODULES = ("text", "image", "training", "selection")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = [
    "NaRAConfig",
    "NaRALoadError",
    "NoiseConditionedAdapter",
    "NoiseLevelError",
    "__version__",
    "convert_reference_checkpoint",
    "core",
    "get_adapter",
    "get_nara_model",
    "image",
    "inject_nara",
    "is_nara_model",
    "load_nara_model",
    "noise_level",
    "remove_nara",
    "selection",
    "text",
    "training",
]
