"""Fine-tune a masked diffusion LM (LLaDA or Dream) with NaRA, NaRA-C, LoRA or full fine-tuning.

    accelerate launch examples/llada/finetune.py
    accelerate launch examples/llada/finetune.py --config examples/llada/configs/math14k.yaml
    accelerate launch examples/llada/finetune.py --config examples/llada/configs/math14k.yaml --adapter lora --rank 16
    accelerate launch examples/llada/finetune.py --config examples/llada/configs/dream_math14k.yaml

The model family (LLaDA or Dream) is read from the model's config; Dream's conventions (mask token, shifted logits,
chat template, module names) follow from it. Multi-GPU engines: ``accelerate launch --config_file
examples/accelerate/{ddp,fsdp2,zero2,zero3}.yaml examples/llada/finetune.py ...``.

With no ``--model``, ``--dataset`` or ``--config``, the embedded default run fine-tunes the toy LLaDA (``toy/``,
pretrained on arithmetic) with NaRA on a notation it cannot read yet ("What is 63&45?", "&" for subtraction; 1,000
training problems) and prints its accuracy on 100 held-out problems before and after, with sample generations; a
minute or two on a CPU. Every field of the YAML file can be given (or overridden) on the command line as
``--field value``; ``--help`` lists every flag with its help, default and choices (diffusers' names such as
``--pretrained_model_name_or_path``, ``--rank``, ``--max_train_steps`` are accepted too). Adapter folders land in
``<output_dir>/best`` (lowest validation loss) and ``<output_dir>/final``; resume an interrupted run with
``--resume_from_checkpoint latest``; ``--push_to_hub --hub_model_id owner/name`` uploads ``final/`` afterwards.
"""

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from accelerate import PartialState

from nara_diffusion.text.finetune import FinetuneConfig, run_finetune
from nara_diffusion.toy import text as toy
from nara_diffusion.training import load_config

HERE = Path(__file__).resolve().parent
TOY_RUN = {
    "model": str(HERE / "toy"),
    "dataset": str(HERE / "data" / "toy_amp_train.json"),
    "test_dataset": str(HERE / "data" / "toy_amp_test.json"),
    "test_kind": "exact",
    **toy.DEMO_SAMPLER,
    "test_batch_size": 50,
    "output_dir": "outputs/toy-llada",
    **toy.FINETUNE_DEFAULTS,
    **toy.DEMO_SCHEDULE,
}


#: Flags that make a real run; without any of them the embedded toy run starts.
REAL_RUN_FLAGS = ("--model", "--pretrained_model_name_or_path", "--config", "--dataset")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default: the command line), train, and print what the run measured."""
    argv = sys.argv[1:] if argv is None else list(argv)
    embedded = not any(a.split("=")[0] in REAL_RUN_FLAGS for a in argv)
    defaults = TOY_RUN if embedded else None
    config = load_config(FinetuneConfig, argv, description=__doc__.splitlines()[0], defaults=defaults)
    result = run_finetune(config)
    if not PartialState().is_main_process:
        return
    print(f"done: {result.global_step} updates; best val loss {result.best_val_loss}; adapter in {result.final_dir}")
    if "test_accuracy_after" in result.metrics:
        after = Path(config.output_dir) / "test_after.jsonl"
        print(
            f"test accuracy: before {result.metrics['test_accuracy_before']:.1%} -> "
            f"after {result.metrics['test_accuracy_after']:.1%} ({config.test_dataset}); generations in {after}"
        )
        for line in after.read_text().splitlines()[:5]:
            record = json.loads(line)
            print(f"  {record['prompt']!r} -> {record['prediction']!r} (gold {record['gold']})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    main()
