"""Pretrain the toy SDXL pipeline on generated scenes of coloured shapes and save it (Hub folder layout).

The pipeline is SDXL's architecture at toy size, built from diffusers' and transformers' own classes (see
`nara_diffusion.toy.image_pretrain`): 32 × 32 images, a 2× VAE, a 1.7 M-parameter UNet with ``text_time``
micro-conditioning, two CLIP text encoders and tokenizers; trained on the plain world of coloured shapes, then
(`learn_stripes`) on the same world with a third of the shapes striped. The committed
``examples/sdxl_dreambooth/toy/`` was made on a 2-core CPU with one thread by

    OMP_NUM_THREADS=1 python examples/sdxl_dreambooth/make_toy_pipeline.py examples/sdxl_dreambooth/toy --seed 0
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from nara_diffusion.toy.image import load_reference_images, subject_similarity
from nara_diffusion.toy.image_pretrain import (
    PretrainConfig,
    pretrain_toy_pipeline,
    scene_accuracy,
    scene_prompts,
    vae_reconstructions,
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder for the pipeline (save_pretrained layout)")
    defaults = PretrainConfig()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the committed toy's setting)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = PretrainConfig(**{k: getattr(args, k) for k in vars(defaults)})
    pipe = pretrain_toy_pipeline(config)
    pipe.save_pretrained(args.output_dir)
    print(f"toy SDXL pipeline written to {args.output_dir} after {time.perf_counter() - start:.0f} s")
    print("read-back accuracy on 12 prompts x 4 seeds:", scene_accuracy(pipe, scene_prompts(), range(4)))
    references = load_reference_images(Path(__file__).resolve().parent / "images")
    recon = vae_reconstructions(pipe.vae, references)
    print(
        f"subject similarity of the instance photos {subject_similarity(references, references):.3f}, "
        f"of their VAE reconstructions {subject_similarity(recon, references):.3f}"
    )
