"""Quality on the toy image task (issue 7): DreamBooth with peft LoRA vs NaRA vs NaRA-C on the toy SDXL pipeline.

Each method fine-tunes ``examples/sdxl_dreambooth/toy`` on the five photos of the striped ball in
``examples/sdxl_dreambooth/images`` with the toy default's settings (`toy_dreambooth_defaults`: 32 px, 300 updates
of batch 4, learning rate 1e-3, prior preservation with 20 base-model images of "a photo of a circle", which
``--no_prior_preservation`` turns off), once per training seed, and is scored on images generated with fixed seeds 0-3:

- subject fidelity: `subject_similarity` of "a photo of sks toy" to the instance photos;
- prompt fidelity: share of the border in the named colour for "a photo of sks toy on a {green,yellow}
  background" (`prompt_fidelity`), and the subject similarity of those same images.

LoRA runs twice: at NaRA's rank (4) and at the rank whose trainable-parameter count comes closest to NaRA's total
(factors + its shared hypernetwork). Writes ``quality_image.md`` (the table) and ``quality_image_grid.png`` to
``--output_dir``.

    OMP_NUM_THREADS=1 python benchmarks/quality_image.py --seeds 0 1 2 --output_dir benchmarks/results
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image

from nara_diffusion.image.dreambooth import DreamBoothConfig, load_base_pipeline
from nara_diffusion.toy.dreambooth import (
    CONTEXT_BACKGROUNDS,
    ToyScores,
    run_toy_dreambooth,
    score_toy_subject,
    toy_dreambooth_defaults,
)
from nara_diffusion.toy.image import load_reference_images

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sdxl_dreambooth"
RANK = 4


@dataclass
class Method:
    name: str
    adapter: str
    r: int


def trainable_parameters(adapter: str, r: int) -> int:
    """Trainable UNet parameters of ``adapter`` at rank ``r`` on the toy pipeline (attached to a fresh copy)."""
    from nara_diffusion.image.dreambooth import attach_adapters

    pipe = load_base_pipeline(str(EXAMPLE / "toy"))
    defaults = toy_dreambooth_defaults(EXAMPLE / "toy", EXAMPLE / "images")
    config = DreamBoothConfig(**{**defaults, "adapter": adapter, "r": r})
    attach_adapters(config, pipe.unet, [], pipe.scheduler)
    return sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)


def methods() -> list[tuple[Method, int]]:
    """The compared methods with their trainable-parameter counts; the matched LoRA rank is searched here."""
    nara = trainable_parameters("nara", RANK)
    lora_per_rank = trainable_parameters("lora", 1)  # LoRA's count is linear in r
    matched = max(1, round(nara / lora_per_rank))
    chosen = [Method("LoRA (peft)", "lora", RANK), Method(f"LoRA (peft), r={matched}", "lora", matched),
              Method("NaRA", "nara", RANK), Method("NaRA-C", "nara-c", RANK)]  # fmt: skip
    return [(m, trainable_parameters(m.adapter, m.r)) for m in chosen]


def _row_images(scores: ToyScores) -> list[Image.Image]:
    """Two instance-prompt images (seeds 0, 1) and each context prompt's seed-0 image."""
    per_prompt = len(scores.context_images) // len(CONTEXT_BACKGROUNDS)
    return [*scores.instance_images[:2], *scores.context_images[::per_prompt]]


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def run(seeds: list[int], out_dir: Path, prior_preservation: bool = True) -> str:
    """Train and score every method with every training seed; write the table and the grid to ``out_dir``; return
    the Markdown table. ``prior_preservation=False`` turns off the toy default's prior preservation (files get a
    ``_no_prior`` suffix)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    defaults = toy_dreambooth_defaults(EXAMPLE / "toy", EXAMPLE / "images")
    defaults["with_prior_preservation"] = prior_preservation
    suffix = "" if prior_preservation else "_no_prior"
    references = load_reference_images(EXAMPLE / "images")
    base = score_toy_subject(load_base_pipeline(defaults["model"]), references)
    lines = [
        "| method | rank | trainable params | subject fidelity | prompt fidelity (background) "
        "| subject fidelity on other backgrounds | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    lines.append(f"| base model (no fine-tuning) | – | 0 | {base.subject:.3f} | {base.context_prompt:.3f} | "
                 f"{base.context_subject:.3f} | – |")  # fmt: skip
    grid_rows = [_row_images(base)]
    work = tempfile.mkdtemp(prefix="quality_image_")  # adapter folders: not results
    for method, params in methods():
        subject, prompt, context_subject, seconds = [], [], [], []
        for seed in seeds:
            config = DreamBoothConfig(
                **{**defaults, "adapter": method.adapter, "r": method.r, "seed": seed, "validation_prompt": None,
                   "report_to": "none", "output_dir": str(Path(work) / f"{method.adapter}-r{method.r}-s{seed}")}
            )  # fmt: skip
            start = time.perf_counter()
            report = run_toy_dreambooth(config)
            seconds.append(time.perf_counter() - start)
            subject.append(report.after.subject)
            prompt.append(report.after.context_prompt)
            context_subject.append(report.after.context_subject)
            if seed == seeds[0]:
                grid_rows.append(_row_images(report.after))
            logging.info("%s seed %d: %s (%.0f s)", method.name, seed, report.after, seconds[-1])
        lines.append(f"| {method.name} | {method.r} | {params:,} | {_fmt(subject)} | {_fmt(prompt)} | "
                     f"{_fmt(context_subject)} | {np.mean(seconds):.0f} |")  # fmt: skip
    tiles = [img.resize((96, 96), Image.Resampling.NEAREST) for row in grid_rows for img in row]
    grid = make_image_grid(tiles, rows=len(grid_rows), cols=len(grid_rows[0]))
    grid.save(out_dir / f"quality_image_grid{suffix}.png")
    shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(lines) + "\n"
    (out_dir / f"quality_image{suffix}.md").write_text(table)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--output_dir", type=Path, default=Path("benchmarks/results"), help="folder of the table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no_prior_preservation", action="store_true", help="turn off the toy default's prior")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("accelerate", "diffusers", "transformers", "nara_diffusion"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    print(run(args.seeds, args.output_dir, prior_preservation=not args.no_prior_preservation))
