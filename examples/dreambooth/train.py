"""DreamBooth with NaRA, NaRA-C or LoRA on any supported family (SDXL, SD 1.5 / 2.x, SD3, Flux): a family-neutral
name for ``examples/sdxl_dreambooth/train.py``, the same script with the same flags.

    accelerate launch examples/dreambooth/train.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog"
"""

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "sdxl_dreambooth" / "train.py"

if __name__ == "__main__":
    runpy.run_path(str(SCRIPT), run_name="__main__")
