"""DreamBooth on SDXL (SD 1.5 / 2.x, SD3, Flux) with NaRA, NaRA-C or LoRA: a few photos of a subject → an adapter.

    accelerate launch examples/sdxl_dreambooth/train.py        # the embedded toy default, about a minute on a CPU
    accelerate launch examples/sdxl_dreambooth/train.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog"
    accelerate launch examples/sdxl_dreambooth/train.py \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_prompt "a photo of a dog" \\
        --validation_prompt "a photo of sks dog in a bucket" \\
        --mixed_precision fp16 --vae madebyollin/sdxl-vae-fp16-fix --gradient_checkpointing --use_8bit_adam

The same script and flags train SD3 / 3.5 and Flux pipelines (the family is read from the pipeline; the
transformer learns the flow-matching objective of diffusers' SD3 / Flux DreamBooth scripts, NaRA reads λ = σ):

    accelerate launch examples/sdxl_dreambooth/train.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --mixed_precision bf16 \\
        --weighting_scheme none --flux_guidance 1.0

(``--weighting_scheme logit_normal|mode|none|sigma_sqrt|cosmap``, ``--logit_mean``, ``--logit_std``, ``--mode_scale``,
``--precondition_outputs`` for SD3, ``--flux_guidance``; ``examples/dreambooth/train.py`` is the same script.)

With no ``--model``, ``--config`` or ``--instance_data_dir``, the script fine-tunes the committed toy pipeline
(``toy/`` next to this file) on the five photos in ``images/`` with toy settings (any other flag still applies),
prints the subject similarity of "a photo of sks toy" before and after, and writes
``<output_dir>/before_after.png``. Otherwise the defaults are diffusers' SDXL recipe (``--model`` defaults to
stabilityai/stable-diffusion-xl-base-1.0).

Every field can be given as ``--field value`` (booleans also as a bare ``--flag``) or in a YAML file
(``--config run.yaml``); ``--help`` lists each with its help, default and choices. diffusers'
``train_dreambooth_lora_sdxl.py`` flags (``--pretrained_model_name_or_path``, ``--rank``, ``--train_batch_size``,
``--gradient_accumulation_steps``, ``--max_train_steps``, ``--lr_scheduler``, ``--lr_warmup_steps``,
``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--resume_from_checkpoint``, ``--push_to_hub``,
``--hub_model_id``, ...) are accepted, so their commands run with this script path. The adapter lands in
``<output_dir>/final`` (load it with ``pipe.load_nara_weights(...)``, see infer.py), validation grids in
``<output_dir>/validation``, TensorBoard logs in ``<output_dir>``; resume an interrupted run with
``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from accelerate import PartialState

from nara_diffusion.image.dreambooth import DreamBoothConfig, run_dreambooth
from nara_diffusion.toy.dreambooth import is_toy_run, run_toy_dreambooth, toy_dreambooth_defaults
from nara_diffusion.training import load_config

HERE = Path(__file__).resolve().parent
TOY_PIPELINE, TOY_IMAGES = HERE / "toy", HERE / "images"


def parse(argv: Optional[Sequence[str]] = None) -> tuple[DreamBoothConfig, bool]:
    """The run's config, and whether it is the embedded toy run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    toy = is_toy_run(argv)
    defaults = toy_dreambooth_defaults(TOY_PIPELINE, TOY_IMAGES) if toy else None
    return load_config(DreamBoothConfig, argv, description=__doc__.splitlines()[0], defaults=defaults), toy


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default: the command line) and run: the toy demo or a real DreamBooth run."""
    config, toy = parse(argv)
    if not toy:
        result = run_dreambooth(config)
        if PartialState().is_main_process:
            print(f"done: {result.global_step} updates; adapter in {result.final_dir}")
        return
    if "OMP_NUM_THREADS" not in os.environ:  # the toy gains nothing from threads and loses much on a busy CPU
        torch.set_num_threads(1)
    report = run_toy_dreambooth(config)
    if report.before is not None:
        for name, scores in (("before", report.before), ("after", report.after)):
            print(
                f"{name:>6}: subject similarity {scores.subject:.3f} ('{config.instance_prompt}'); "
                f"on other backgrounds: background match {scores.context_prompt:.3f}, "
                f"subject similarity {scores.context_subject:.3f}"
            )
        print(f"before/after grid: {report.grid}")
    print(f"done: {report.global_step} updates; adapter in {report.final_dir}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    main()
