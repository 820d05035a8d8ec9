"""The toy worlds the demos and benchmarks run on: small tasks with exact answers, small base models built from
scratch, and their metrics. Nothing in the library imports them; a user of LLaDA-8B or SDXL never needs them.

- `nara_diffusion.toy.text`: generated arithmetic tasks, a character-level chat tokenizer, the toy LLaDA's settings.
- `nara_diffusion.toy.image`: toy scenes and subjects, their drawing and classification, fidelity metrics.
- `nara_diffusion.toy.image_pretrain`: the toy SDXL-architecture pipeline, built and pretrained from scratch.
- `nara_diffusion.toy.dreambooth`: DreamBooth on the toy pipeline, scored before and after.

The submodules are imported on their own (the image ones need diffusers).
"""
