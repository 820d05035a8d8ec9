"""Quality on the toy image task (issue 15): DreamBooth with peft LoRA vs NaRA vs NaRA-C on the toy SDXL pipeline.

Each method fine-tunes ``examples/sdxl_dreambooth/toy`` on the five photos of the striped ball in
``examples/sdxl_dreambooth/images`` with the toy default's settings (`toy_dreambooth_defaults`; prior preservation
unless ``--no_prior_preservation``), once per training seed, and is scored on images generated with fixed sampling
seeds (``--eval_seeds``, 20 Euler steps, guidance 5):

- subject fidelity: `subject_similarity` of each "a photo of sks toy" image to the instance photos, and the share of
  those images that score above every hand-drawn ball that is not the subject (`non_subject_ceiling`);
- prompt fidelity: for "a photo of sks toy on a {green,yellow} background", the share of each image's border frame
  in the named colour (`prompt_fidelity`), and the subject similarity of those same images.

LoRA runs twice: at NaRA's rank (4) and at the rank whose trainable-parameter count comes closest to NaRA's total
(factors + its shared hypernetwork). Per method: mean, sample standard deviation and a 95% t-interval over training
seeds (each seed's score is its mean over the sampled images); per comparison with LoRA: the paired difference with
a 95% bootstrap interval resampling training seeds and sampled images (`benchmarks/_stats.py`).

Every finished (method, seed) run is cached under ``<output_dir>/quality_image_runs[_no_prior]/`` as JSON (its
settings and time) and ``pictures.png``, every picture it generated (a row per prompt, a column per sampling seed),
keyed by its settings: re-running skips finished runs, and a changed setting or toy pipeline reruns them. The scores
are computed from the cached pictures each time the tables are written, so a changed metric re-scores without
retraining; runs with disjoint ``--seeds`` may go in parallel, and a last run with
all seeds then only collects them. ``--quick`` is a smoke test (2 updates, 2 sampling steps, one seed).
Writes ``quality_image[_no_prior].md`` (the tables) and ``quality_image_grid[_no_prior].png`` to ``--output_dir``.

    OMP_NUM_THREADS=1 python benchmarks/quality_image.py --output_dir benchmarks/results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _stats

from nara_diffusion.core.folders import write_atomically
from nara_diffusion.image.dreambooth import DreamBoothConfig, load_base_pipeline
from nara_diffusion.toy.dreambooth import (
    CONTEXT_BACKGROUNDS,
    ToyScores,
    labelled_grid,
    run_toy_dreambooth,
    score_pictures,
    score_toy_subject,
    toy_dreambooth_defaults,
)
from nara_diffusion.toy.image import Scene, draw_scene, load_reference_images, subject_similarity

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sdxl_dreambooth"
RANK = 4
METRICS = {
    "subject": "subject fidelity",
    "shown": "pictures past every non-subject",
    "context_prompt": "prompt fidelity (background)",
    "context_subject": "subject fidelity on other backgrounds",
}
QUICK = {"max_steps": 2, "num_inference_steps": 2, "num_class_images": 2, "sample_batch_size": 2}
#: Version of what a cached run holds (2: every picture, no scores); an older cache is rerun.
CACHE_FORMAT = 2


class Method(NamedTuple):
    """A compared adapter: its table name, ``DreamBoothConfig.adapter`` and rank."""

    name: str
    adapter: str
    r: int

    @property
    def key(self) -> str:
        return f"{self.adapter}-r{self.r}"


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


def pipeline_digest() -> str:
    """sha256 of the toy pipeline's weight files: a retrained toy invalidates the cache."""
    digest = hashlib.sha256()
    for path in sorted((EXAMPLE / "toy").rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def settings_key(settings: dict[str, Any]) -> str:
    """A short hash of the settings that determine a run's scores."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def picture_sheet(scores: ToyScores) -> Image.Image:
    """Every picture of ``scores`` in one image: a row per prompt (instance prompt first), a column per seed."""
    n, context = len(scores.instance_images), scores.context_images
    rows = [scores.instance_images, *(context[k : k + n] for k in range(0, len(context), n))]
    size = scores.instance_images[0].width
    sheet = Image.new("RGB", (size * len(rows[0]), size * len(rows)))
    for i, row in enumerate(rows):
        for j, picture in enumerate(row):
            sheet.paste(picture.convert("RGB"), (j * size, i * size))
    return sheet


def non_subject_ceiling(references: list) -> float:
    """The higher `subject_similarity` of two hand-drawn balls that are not the subject: a plain red one (its red
    without white) and a blue-and-white striped one (stripes of the wrong colour)."""
    plain = Scene("circle", "red", "green", 16, 16, 9)
    other = Scene("circle", "blue", "green", 16, 16, 9, band=5)
    return max(subject_similarity([draw_scene(s)], references) for s in (plain, other))


def sheet_scores(sheet: Image.Image, references: list, size: int) -> ToyScores:
    """`picture_sheet`'s pictures (``size`` px each) scored again (`score_pictures`), with ``per_image["shown"]``:
    1 for each instance-prompt picture whose subject similarity passes `non_subject_ceiling`, else 0."""
    tiles = [[sheet.crop((j * size, i * size, (j + 1) * size, (i + 1) * size)) for j in range(sheet.width // size)]
             for i in range(sheet.height // size)]  # fmt: skip
    scores = score_pictures(tiles[0], [t for row in tiles[1:] for t in row], references)
    ceiling = non_subject_ceiling(references)
    scores.per_image["shown"] = [float(v > ceiling) for v in scores.per_image["subject"]]
    return scores


def cached_run(cache: Path, name: str, settings: dict[str, Any], compute) -> tuple[dict, Image.Image]:
    """``compute()`` → (record, picture sheet), or the cached result of the same ``settings`` under ``cache/name``."""
    folder = cache / name
    key = settings_key(settings)
    record_path = folder / "record.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings_key") == key:
            return record, Image.open(folder / "pictures.png").convert("RGB")
    record, sheet = compute()
    record = {**record, "settings_key": key, "settings": settings}

    def write(tmp: Path) -> None:
        (tmp / "record.json").write_text(json.dumps(record, indent=1))
        sheet.save(tmp / "pictures.png")

    try:
        write_atomically(folder, write)
    except OSError:  # a parallel run wrote the same record (the base model's) at the same moment
        if json.loads(record_path.read_text()).get("settings_key") != key:
            raise
    return record, sheet


def grid_pictures(scores: ToyScores) -> list[Image.Image]:
    """Two instance-prompt images (the first two sampling seeds) and each context prompt's first image."""
    per_prompt = len(scores.context_images) // len(CONTEXT_BACKGROUNDS)
    return [*scores.instance_images[:2], *scores.context_images[::per_prompt]]


def _fmt(summary: _stats.Summary) -> str:
    if summary.n == 1:
        return f"{summary.mean:.3f}"
    return f"{summary.mean:.3f} ± {summary.std:.3f} [{summary.low:.3f}, {summary.high:.3f}]"


def _fmt_diff(d: _stats.PairedDifference) -> str:
    return f"{d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def run(
    seeds: list[int],
    eval_seeds: list[int],
    out_dir: Path,
    prior_preservation: bool = True,
    quick: bool = False,
    progress: bool = True,
) -> str:
    """Train and score every method with every training seed (cached), write the tables and the grid to
    ``out_dir``; return the Markdown."""
    out_dir = Path(out_dir)
    suffix = ("" if prior_preservation else "_no_prior") + ("_quick" if quick else "")
    cache = out_dir / f"quality_image_runs{suffix}"
    cache.mkdir(parents=True, exist_ok=True)
    defaults = toy_dreambooth_defaults(EXAMPLE / "toy", EXAMPLE / "images")
    defaults.update(with_prior_preservation=prior_preservation, validation_prompt=None, report_to="none")
    if quick:
        defaults.update(QUICK)
    references = load_reference_images(EXAMPLE / "images")
    digest = pipeline_digest()
    score_kw = {"seeds": eval_seeds, "num_inference_steps": defaults["num_inference_steps"]}
    shared = {"pipeline": digest, "eval_seeds": eval_seeds, "cache_format": CACHE_FORMAT,
              **{k: v for k, v in defaults.items() if k != "output_dir"}}  # fmt: skip
    shared.pop("model"), shared.pop("instance_data_dir")

    def score_base() -> tuple[dict, Image.Image]:
        scores = score_toy_subject(load_base_pipeline(defaults["model"]), references, **score_kw)
        return {"seconds": 0.0}, picture_sheet(scores)

    size = defaults["resolution"]
    base = sheet_scores(cached_run(cache, "base", {**shared, "base": True}, score_base)[1], references, size)
    chosen = methods()
    jobs = [(m, params, s) for m, params in chosen for s in seeds]
    records: dict[str, list[dict]] = {m.key: [] for m, _ in chosen}
    scored: dict[str, list[ToyScores]] = {m.key: [] for m, _ in chosen}
    bar = tqdm(jobs, desc="quality_image", unit="run", disable=not progress)
    for method, _params, seed in bar:
        bar.set_postfix_str(f"{method.name} seed {seed}")
        settings = {**shared, "adapter": method.adapter, "r": method.r, "seed": seed}

        def train(method: Method = method, seed: int = seed) -> tuple[dict, Image.Image]:
            config = DreamBoothConfig(
                **{**defaults, "adapter": method.adapter, "r": method.r, "seed": seed,
                   "output_dir": str(cache / "work" / f"{method.key}-s{seed}"),
                   "class_data_dir": str(cache / "work" / f"class_images-s{seed}")}
            )  # fmt: skip
            start = time.perf_counter()
            report = run_toy_dreambooth(config, seeds=eval_seeds, score_before=False)
            seconds = time.perf_counter() - start
            shutil.rmtree(config.output_dir, ignore_errors=True)  # the adapter folder: not a result
            logging.info("%s seed %d: %s (%.0f s)", method.name, seed, report.after, seconds)
            return {"seconds": seconds}, picture_sheet(report.after)

        record, sheet = cached_run(cache, f"{method.key}-s{seed}", settings, train)
        records[method.key].append(record)
        scored[method.key].append(sheet_scores(sheet, references, size))

    for seed in seeds:  # this run's class images (a parallel run with other seeds keeps its own)
        shutil.rmtree(cache / "work" / f"class_images-s{seed}", ignore_errors=True)

    def per_seed(key: str, metric: str) -> list[float]:
        return [float(np.mean(s.per_image[metric])) for s in scored[key]]

    header = " | ".join(METRICS.values())
    lines = [f"| method | rank | trainable params | {header} | s / run |", "|---" * (len(METRICS) + 4) + "|"]
    lines.append(
        "| base model (no fine-tuning) | – | 0 | "
        + " | ".join(f"{np.mean(base.per_image[m]):.3f}" for m in METRICS)
        + " | – |"
    )
    for method, params in chosen:
        cells = [_fmt(_stats.summarize(per_seed(method.key, m))) for m in METRICS]
        seconds = np.mean([r["seconds"] for r in records[method.key]])
        lines.append(f"| {method.name} | {method.r} | {params:,} | {' | '.join(cells)} | {seconds:.0f} |")
    by_key = {m.key: m for m, _ in chosen}
    lora, matched = chosen[0][0], chosen[1][0]
    lines += ["", f"| paired difference (95% bootstrap interval) | {header} |", "|---" * (len(METRICS) + 1) + "|"]
    for a, b in (("nara-r4", lora.key), ("nara-r4", matched.key), ("nara-c-r4", lora.key)):
        cells = [
            _fmt_diff(_stats.paired_bootstrap([s.per_image[m] for s in scored[a]],
                                              [s.per_image[m] for s in scored[b]]))
            for m in METRICS
        ]  # fmt: skip
        lines.append(f"| {by_key[a].name} − {by_key[b].name} | {' | '.join(cells)} |")
    table = "\n".join(lines) + "\n"

    rows = [grid_pictures(base), *(grid_pictures(scored[m.key][0]) for m, _ in chosen)]
    row_titles = ["base model", *(f"{m.name}\n(training seed {seeds[0]})" for m, _ in chosen)]
    columns = [f"sks toy\nsample {eval_seeds[0]}", f"sks toy\nsample {eval_seeds[min(1, len(eval_seeds) - 1)]}"]
    columns += [f"on {c}\nsample {eval_seeds[0]}" for c in CONTEXT_BACKGROUNDS]
    if len(eval_seeds) == 1:
        columns = columns[:1] + columns[2:]  # `grid_pictures` took the one instance image once
    labelled_grid(rows, row_titles, columns, zoom=3).save(out_dir / f"quality_image_grid{suffix}.png")
    (out_dir / f"quality_image{suffix}.md").write_text(table)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=list(range(8)), help="sampling seeds")
    parser.add_argument("--output_dir", type=Path, default=Path("benchmarks/results"), help="folder of the tables")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no_prior_preservation", action="store_true", help="turn off the toy default's prior")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 updates, 2 sampling steps, seed 0 only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for noisy in ("accelerate", "diffusers", "transformers", "nara_diffusion"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    seeds, eval_seeds = (args.seeds[:1], args.eval_seeds[:1]) if args.quick else (args.seeds, args.eval_seeds)
    print(run(seeds, eval_seeds, args.output_dir, prior_preservation=not args.no_prior_preservation, quick=args.quick))
