"""nara-diffusion: noise-aware low-rank adapters (NaRA) for diffusion models, the peft way.

```python
import nara_diffusion as nd
model = nd.get_nara_model(base, nd.NaRAConfig(r=32, target_modules=["q_proj", "v_proj"]))
logits = model(input_ids, noise_level=lam).logits   # lam: float or [B] tensor in [0, 1]
```
"""

from . import text, training
from .core import (
    NaRAConfig,
    NaRALinear,
    NaRALoadError,
    NaRAModel,
    NoiseConditionedAdapter,
    NoiseLevelError,
    convert_reference_checkpoint,
    get_adapter,
    get_nara_model,
    inject_nara,
    is_nara_model,
    load_nara_model,
    noise_level,
    noise_level_from_mask,
    remove_nara,
    timestep_to_noise_level,
    validate_noise_level,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # `nd.image` imports diffusers; load it on first use so that text-only users do not pay for it.
    if name == "image":
        import importlib

        return importlib.import_module(".image", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NaRAConfig",
    "NaRALinear",
    "NaRALoadError",
    "NaRAModel",
    "NoiseConditionedAdapter",
    "NoiseLevelError",
    "__version__",
    "convert_reference_checkpoint",
    "get_adapter",
    "get_nara_model",
    "image",
    "inject_nara",
    "is_nara_model",
    "load_nara_model",
    "noise_level",
    "noise_level_from_mask",
    "remove_nara",
    "text",
    "timestep_to_noise_level",
    "training",
    "validate_noise_level",
]
