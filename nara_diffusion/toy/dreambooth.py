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
from diffusers.utils import make_image_grid
from PIL import Image

from ..image.dreambooth import DreamBoothConfig, load_base_pipeline, run_dreambooth
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
#: Fields whose presence on the command line means a real (non-toy) run.
REAL_RUN_FLAGS = ("--model", "--pretrained_model_name_or_path", "--config", "--instance_data_dir")


def toy_dreambooth_defaults(pipeline_dir: Union[str, Path], images_dir: Union[str, Path]) -> dict[str, Any]:
    """`DreamBoothConfig` fields of the toy run: the toy pipeline and subject at 32 px, NaRA rank 4, 300 updates
    of batch 4 at learning rate 1e-3 (toy scale: the diffusers recipe's 1e-4 × 500 barely moves a model this small),
    centre crops (random 32-px crops of the wide photos cut the ball), prior preservation with 20 images of
    "a photo of a circle" made by the base model (without it, "sks toy" drags every prompt that contains it to the
    instance photos: background match 0.00 instead of 0.24 in BENCHMARKS.md), one validation grid at the end."""
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
        "learning_rate": 1e-3,
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
    the recontextualised ones, each a mean over prompts and seeds in [0, 1]; the images, prompt-major."""

    subject: float
    context_prompt: float
    context_subject: float
    instance_images: list[Image.Image] = field(repr=False)
    context_images: list[Image.Image] = field(repr=False)


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
    (`subject_similarity` against ``references``; `prompt_fidelity` of the named background)."""
    kw = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    contexts = context_prompts(instance_prompt)
    instance = generate(pipe, [instance_prompt], seeds, **kw)
    context = generate(pipe, contexts, seeds, **kw)
    fidelity = [prompt_fidelity(img, contexts[k // len(seeds)]) for k, img in enumerate(context)]
    return ToyScores(
        subject=subject_similarity(instance, references),
        context_prompt=float(sum(fidelity) / len(fidelity)),
        context_subject=subject_similarity(context, references),
        instance_images=instance,
        context_images=context,
    )


def before_after_grid(before: ToyScores, after: ToyScores, path: Union[str, Path], zoom: int = 4) -> Path:
    """One PNG: rows = instance prompt before, after; first context prompt before, after (``zoom``× nearest)."""
    n = len(before.instance_images)
    rows = [before.instance_images, after.instance_images, before.context_images[:n], after.context_images[:n]]
    tiles = [img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST) for row in rows for img in row]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(tiles, rows=len(rows), cols=n).save(path)
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
) -> ToyRunReport:
    """Score the base pipeline, train (`run_dreambooth`), score again (pictures from ``seeds``) and write
    ``<output_dir>/<grid_name>``.

    Under ``accelerate launch`` every process trains; only the main one generates and scores.
    """
    config.validate()  # before the pipeline loads
    main = PartialState().is_main_process
    pipe = pipe or load_base_pipeline(config.model)
    references = load_reference_images(config.instance_data_dir, config.resolution)
    kw = {"instance_prompt": config.instance_prompt, "num_inference_steps": config.num_inference_steps, "seeds": seeds}
    before = score_toy_subject(pipe, references, **kw) if main else None
    result = run_dreambooth(config, pipe)
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    trainable = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    after = grid = None
    if main:
        after = score_toy_subject(pipe, references, **kw)
        grid = before_after_grid(before, after, Path(config.output_dir) / grid_name)
    return ToyRunReport(before, after, grid, result.final_dir, result.global_step, trainable)


__all__ = [
    "CLASS_PROMPT",
    "CONTEXT_BACKGROUNDS",
    "INSTANCE_PROMPT",
    "ToyRunReport",
    "ToyScores",
    "before_after_grid",
    "context_prompts",
    "is_toy_run",
    "run_toy_dreambooth",
    "score_toy_subject",
    "toy_dreambooth_defaults",
]
