"""NaRA for diffusers image models: UNets and SD3 / Flux transformers conditioned on the noise level of every call,
pipeline loaders, DreamBooth.

```python
import nara_diffusion as nd
unet = nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)   # λ = t/T from every call
flux = nd.image.inject_nara(pipe.transformer, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)  # SD3 / Flux: λ = σ
pipe.load_nara_weights("outputs/dreambooth/final")  # every diffusers pipeline has it after `import nara_diffusion`
nd.image.run_dreambooth(nd.image.DreamBoothConfig(instance_data_dir="dog/", instance_prompt="a photo of sks dog"))
```
"""

from .dreambooth import DreamBoothConfig, run_dreambooth
from .loaders import (
    NaRALoaderMixin,
    NaRAStableDiffusionPipeline,
    NaRAStableDiffusionXLPipeline,
    enable_nara_loading,
    nara_state_dict,
    read_nara_weights,
    save_nara_weights,
)
from .prompts import disable_per_step_prompt_encoding, enable_per_step_prompt_encoding
from .unet import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, TimestepReader, inject_nara

__all__ = [
    "TEXT_ENCODER_TARGET_MODULES",
    "UNET_TARGET_MODULES",
    "DreamBoothConfig",
    "NaRALoaderMixin",
    "NaRAStableDiffusionPipeline",
    "NaRAStableDiffusionXLPipeline",
    "TimestepReader",
    "disable_per_step_prompt_encoding",
    "enable_nara_loading",
    "enable_per_step_prompt_encoding",
    "inject_nara",
    "nara_state_dict",
    "read_nara_weights",
    "run_dreambooth",
    "save_nara_weights",
]
