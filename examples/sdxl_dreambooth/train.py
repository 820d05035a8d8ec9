"""DreamBooth on SDXL (or SD 1.5 / 2.x) with NaRA, NaRA-C or LoRA: a few photos of a subject → an adapter folder.

    accelerate launch examples/sdxl_dreambooth/train.py \\
        --instance_data_dir images/ --instance_prompt "a photo of sks dog"
    accelerate launch examples/sdxl_dreambooth/train.py \\
        --instance_data_dir images/ --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_prompt "a photo of a dog" \\
        --validation_prompt "a photo of sks dog in a bucket" \\
        --mixed_precision fp16 --vae madebyollin/sdxl-vae-fp16-fix --gradient_checkpointing --use_8bit_adam

Every field can be given as ``--field value`` (booleans also as a bare ``--flag``) or in a YAML file
(``--config run.yaml``); ``--help`` lists them. The adapter lands in ``<output_dir>/final`` (load it with
``pipe.load_nara_weights(...)``, see infer.py), validation grids in ``<output_dir>/validation``, TensorBoard logs in
``<output_dir>``; resume an interrupted run with ``--resume``.
"""

import logging

from accelerate import PartialState

from nara_diffusion.image.dreambooth import DreamBoothConfig, run_dreambooth
from nara_diffusion.training import load_config

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = load_config(DreamBoothConfig, description=__doc__.splitlines()[0])
    result = run_dreambooth(config)
    if PartialState().is_main_process:
        print(f"done: {result.global_step} updates; adapter in {result.final_dir}")
