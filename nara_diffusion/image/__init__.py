"""NaRA for diffusers image models: UNets conditioned on the diffusion timestep, pipeline loaders, DreamBooth.

```python
import nara_diffusion as nd
unet = nd.image.add_nara(pipe.unet, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)   # λ = t/T from every call
pipe = nd.image.enable_nara_loading(pipe)          # or nd.image.NaRAStableDiffusionXLPipeline.from_pretrained(...)
pipe.load_nara_weights("outputs/dreambooth/final")
```
"""

from .loaders import (
    CONFIG_NAME,
    WEIGHT_NAME,
    NaRALoaderMixin,
    NaRALoadError,
    NaRAStableDiffusionPipeline,
    NaRAStableDiffusionXLPipeline,
    enable_nara_loading,
    nara_state_dict,
    read_nara_weights,
    save_nara_weights,
)
from .prompts import disable_per_step_prompt_encoding, enable_per_step_prompt_encoding
from .unet import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, TimestepReader, add_nara, remove_nara

__all__ = [
    "CONFIG_NAME",
    "TEXT_ENCODER_TARGET_MODULES",
    "UNET_TARGET_MODULES",
    "WEIGHT_NAME",
    "NaRALoadError",
    "NaRALoaderMixin",
    "NaRAStableDiffusionPipeline",
    "NaRAStableDiffusionXLPipeline",
    "TimestepReader",
    "add_nara",
    "disable_per_step_prompt_encoding",
    "enable_nara_loading",
    "enable_per_step_prompt_encoding",
    "nara_state_dict",
    "read_nara_weights",
    "remove_nara",
    "save_nara_weights",
]
