"""DreamBooth on the toy pipeline: its settings, subject / prompt fidelity before and after, a before/after grid.

``examples/sdxl_dreambooth/train.py`` with no model, config or instance folder runs `run_toy_dreambooth` with
`toy_dreambooth_defaults`; ``benchmarks/quality_image.py`` runs the same function per adapter and seed::

    from nara_diffusion.toy.dreambooth import run_toy_dreambooth, toy_dreambooth_defaults
    from nara_diffusion.image.dreambooth import DreamBoothConfig
    report = run_toy_dreambooth(DreamBoothConfig(**toy_dreambooth_defaults("toy/", "images/")))
    print(report.subject_before, report.subject_after)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from accelerate import PartialState
from PIL import Image, ImageDraw, ImageFont

from ..image.dreambooth import DreamBoothConfig, load_base_pipeline, run_dreambooth
from ..image.unet import UNET_TARGET_MODULES
from .image import TOY_RESOLUTION, load_reference_images, prompt_fidelity, subject_similarity
from .image_pretrain import generate

INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of a circle"  # the toy world's nearest class to a ball
#: Recontextualisation: the subject on palette backgrounds none of the instance photos has.
CONTEXT_BACKGROUNDS = ("green", "yellow")


def context_prompts(instance_prompt: str = INSTANCE_PROMPT) -> list[str]:
    """``"<instance prompt> on a green background"`` and the same with yellow."""
    return [f"{instance_prompt} on a {colour} background" for colour in CONTEXT_BACKGROUNDS]


EVAL_SEEDS = (0, 1, 2, 3)
#: The toy run's targets: the attention projections (diffusers' LoRA targets) and the feed-forward layers of the
#: UNet's transformer blocks (GEGLU input projection, output projection).
TOY_TARGET_MODULES = (*UNET_TARGET_MODULES, "ff.net.0.proj", "ff.net.2")
#: Fields whose presence on the command line means a real (non-toy) run.
REAL_RUN_FLAGS = ("--model", "--pretrained_model_name_or_path", "--config", "--instance_data_dir")


def toy_dreambooth_defaults(pipeline_dir: Union[str, Path], images_dir: Union[str, Path]) -> dict[str, Any]:
    """`DreamBoothConfig` fields of the toy run: the toy pipeline and subject at 32 px, NaRA rank 4 on the UNet's
    attention projections and the feed-forward layers of its transformer blocks (`TOY_TARGET_MODULES`), 300 updates
    of batch 4 at learning rate 2e-3, centre crops (random 32-px crops of the wide photos cut the ball), prior
    preservation with 20 images of "a photo of a circle" made by the base model (without it, "sks toy" drags every
    prompt that contains it towards the instance photos), one validation grid at the end.

    Why (issue 15; NaRA, training seeds 0-2, sampling seeds 0-7): on the attention projections alone, 150 updates at
    1e-3 drew the striped ball in 7 of 24 pictures (subject similarity > 0.45), and 300 updates, 2e-3, rank 8, prior
    weight 0.5, no prior, Min-SNR 5, guidance 7.5 or the prompts "sks circle" / "sks ball" did not change that: the
    same sampling seeds kept a plain red or purple ball. With the feed-forward layers as well, 300 updates at 2e-3
    draw it in 21 of 24 (23 by eye), at some cost in background match (see BENCHMARKS.md)."""
    return {
        "model": str(Path(pipeline_dir).resolve()),
        "instance_data_dir": str(Path(images_dir).resolve()),
        "instance_prompt": INSTANCE_PROMPT,
        "resolution": TOY_RESOLUTION,
        "center_crop": True,
        "with_prior_preservation": True,
        "class_prompt": CLASS_PROMPT,
        "num_class_images": 20,
        "sample_batch_size": 10,
        "r": 4,
        "target_modules": list(TOY_TARGET_MODULES),
        "learning_rate": 2e-3,
        "max_steps": 300,
        "batch_size": 4,
        "grad_accum": 1,
        "validation_prompt": context_prompts()[0],
        "validation_steps": 0,
        "num_inference_steps": 20,
        "output_dir": "outputs/toy-dreambooth",
        "eval_every": 0,
    }


def is_toy_run(argv: Sequence[str]) -> bool:
    """True when the command line names no model, config file or instance folder (``--field value`` or
    ``--field=value``): the example then runs the embedded toy default."""
    return not any(arg == flag or arg.startswith(flag + "=") for arg in argv for flag in REAL_RUN_FLAGS)


@dataclass
class ToyScores:
    """Subject fidelity of the instance prompt's images and prompt (background) fidelity and subject fidelity of
    the recontextualised ones, each a mean over prompts and seeds in [0, 1]; the prompts (instance prompt first),
    the images (prompt-major) and each image's scores (``per_image[name]``, in the images' order)."""

    subject: float
    context_prompt: float
    context_subject: float
    instance_images: list[Image.Image] = field(repr=False)
    context_images: list[Image.Image] = field(repr=False)
    prompts: list[str] = field(default_factory=list, repr=False)
    per_image: dict[str, list[float]] = field(default_factory=dict, repr=False)


def score_pictures(
    instance_images: Sequence[Image.Image],
    context_images: Sequence[Image.Image],
    references: Sequence[Any],
    instance_prompt: str = INSTANCE_PROMPT,
) -> ToyScores:
    """Score pictures already made: ``instance_images`` of the instance prompt (one per sampling seed) and
    ``context_images`` of its `context_prompts` (prompt-major, the same seeds per prompt)."""
    contexts = context_prompts(instance_prompt)
    per_prompt = len(instance_images)
    if len(context_images) != per_prompt * len(contexts):
        raise ValueError(f"{len(context_images)} context images for {len(contexts)} prompts × {per_prompt} seeds")
    per_image = {
        "subject": [subject_similarity([img], references) for img in instance_images],
        "context_prompt": [prompt_fidelity(img, contexts[k // per_prompt]) for k, img in enumerate(context_images)],
        "context_subject": [subject_similarity([img], references) for img in context_images],
    }
    mean = {name: float(sum(v) / len(v)) for name, v in per_image.items()}
    return ToyScores(
        **mean,
        instance_images=list(instance_images),
        context_images=list(context_images),
        prompts=[instance_prompt, *contexts],
        per_image=per_image,
    )


def score_toy_subject(
    pipe: Any,
    references: Sequence[Any],
    *,
    instance_prompt: str = INSTANCE_PROMPT,
    seeds: Sequence[int] = EVAL_SEEDS,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
) -> ToyScores:
    """Generate the instance prompt and its `context_prompts` with fixed ``seeds`` and score them
    (`score_pictures`: `subject_similarity` against ``references``; `prompt_fidelity` of the named background)."""
    kw = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    instance = generate(pipe, [instance_prompt], seeds, **kw)
    context = generate(pipe, context_prompts(instance_prompt), seeds, **kw)
    return score_pictures(instance, context, references, instance_prompt)


def labelled_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_titles: Sequence[str],
    column_titles: Sequence[str],
    zoom: int = 4,
    gap: int = 4,
) -> Image.Image:
    """One picture of ``rows`` of equally sized images, each magnified ``zoom``× (nearest neighbour), with a title
    left of every row and above every column (both may span lines), in PIL's built-in bitmap font (no download).

    Raises:
        ValueError: the titles do not match the rows and columns.
    """
    columns = len(column_titles)
    if len(row_titles) != len(rows) or any(len(row) != columns for row in rows):
        raise ValueError(f"{len(rows)} rows of {[len(r) for r in rows]} images need {len(rows)} row titles and "
                         f"{columns} column titles per row; got {len(row_titles)} row titles.")  # fmt: skip
    font = ImageFont.load_default_imagefont()
    tile_w, tile_h = rows[0][0].width * zoom, rows[0][0].height * zoom
    line_h = font.getbbox("Ag")[3] + 2

    def text_width(text: str) -> int:
        return max(font.getbbox(line)[2] for line in text.split("\n"))

    left = max(text_width(t) for t in row_titles) + 2 * gap
    top = max(len(t.split("\n")) for t in column_titles) * line_h + gap
    canvas = Image.new("RGB", (left + columns * (tile_w + gap), top + len(rows) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(column_titles):
        x = left + j * (tile_w + gap) + (tile_w - text_width(title)) // 2
        draw.multiline_text((x, gap // 2), title, fill="black", font=font, spacing=2)
    for i, (title, row) in enumerate(zip(row_titles, rows, strict=True)):
        y = top + i * (tile_h + gap)
        height = len(title.split("\n")) * line_h
        draw.multiline_text((gap, y + (tile_h - height) // 2), title, fill="black", font=font, spacing=2)
        for j, image in enumerate(row):
            tile = image.convert("RGB").resize((tile_w, tile_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + j * (tile_w + gap), y))
    return canvas


def before_after_grid(
    before: ToyScores, after: ToyScores, path: Union[str, Path], seeds: Sequence[int] = EVAL_SEEDS, zoom: int = 4
) -> Path:
    """One labelled PNG: for the instance prompt and each context prompt, a row before and a row after training;
    one column per sampling seed."""
    n = len(before.instance_images)
    rows, titles = [], []
    contexts = len(before.context_images) // n
    for k in range(1 + contexts):
        for name, scores in (("before", before), ("after", after)):
            images = scores.instance_images if k == 0 else scores.context_images[(k - 1) * n : k * n]
            rows.append(images)
            titles.append(f"{name}:\n{scores.prompts[k]}")
    grid = labelled_grid(rows, titles, [f"seed {s}" for s in seeds[:n]], zoom=zoom)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


@dataclass
class ToyRunReport:
    """What `run_toy_dreambooth` measured and wrote (scores and grid on the main process only, else None)."""

    before: Optional[ToyScores]
    after: Optional[ToyScores]
    grid: Optional[Path]
    final_dir: Path
    global_step: int
    trainable_parameters: int


def run_toy_dreambooth(
    config: DreamBoothConfig,
    pipe: Optional[Any] = None,
    grid_name: str = "before_after.png",
    seeds: Sequence[int] = EVAL_SEEDS,
    score_before: bool = True,
) -> ToyRunReport:
    """Score the base pipeline, train (`run_dreambooth`), score again (pictures from ``seeds``) and write
    ``<output_dir>/<grid_name>``. ``score_before=False`` skips the base's scores and the grid (a benchmark scores
    the base once).

    Under ``accelerate launch`` every process trains; only the main one generates and scores.
    """
    config.validate()  # before the pipeline loads
    main = PartialState().is_main_process
    pipe = pipe or load_base_pipeline(config.model)
    references = load_reference_images(config.instance_data_dir, config.resolution)
    kw = {"instance_prompt": config.instance_prompt, "num_inference_steps": config.num_inference_steps, "seeds": seeds}
    before = score_toy_subject(pipe, references, **kw) if main and score_before else None
    result = run_dreambooth(config, pipe)
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    trainable = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    after = grid = None
    if main:
        after = score_toy_subject(pipe, references, **kw)
        if before is not None:
            grid = before_after_grid(before, after, Path(config.output_dir) / grid_name, seeds)
    return ToyRunReport(before, after, grid, result.final_dir, result.global_step, trainable)


__all__ = [
    "CLASS_PROMPT",
    "CONTEXT_BACKGROUNDS",
    "INSTANCE_PROMPT",
    "TOY_TARGET_MODULES",
    "ToyRunReport",
    "ToyScores",
    "before_after_grid",
    "context_prompts",
    "is_toy_run",
    "labelled_grid",
    "run_toy_dreambooth",
    "score_pictures",
    "score_toy_subject",
    "toy_dreambooth_defaults",
]
