"""Fine-tune a masked diffusion LM (LLaDA) with NaRA, NaRA-C, LoRA or full fine-tuning.

    accelerate launch examples/llada/finetune.py --config examples/llada/configs/math14k.yaml
    accelerate launch examples/llada/finetune.py --config examples/llada/configs/math14k.yaml --adapter lora --r 16

Every field of the YAML file can be given (or overridden) on the command line as ``--field value``; run with
``--help`` for the list. Adapter folders land in ``<output_dir>/best`` (lowest validation loss) and
``<output_dir>/final``; resume an interrupted run with ``--resume true``.
"""

import logging

from accelerate import PartialState

from nara_diffusion.text.finetune import FinetuneConfig, run_finetune
from nara_diffusion.training import load_config

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    config = load_config(FinetuneConfig, description=__doc__.splitlines()[0])
    result = run_finetune(config)
    if PartialState().is_main_process:
        print(
            f"done: {result.global_step} updates; best val loss {result.best_val_loss}; adapter in {result.final_dir}"
        )
