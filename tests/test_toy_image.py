"""The toy image world: scene metrics on images whose answer is known, the committed toy pipeline still following its
prompts, the subject's instance photos, and the toy default of examples/sdxl_dreambooth/train.py."""

from __future__ import annotations

import json
from types import ModuleType

import numpy as np
import pytest
import torch
from builders import SDXL_EXAMPLE, example_module, torch_threads

from nara_diffusion.toy.image import (
    PALETTE,
    Scene,
    classify_scene,
    draw_scene,
    draw_subject,
    load_reference_images,
    named_colours,
    prompt_fidelity,
    random_scenes,
    subject_similarity,
)

TOY = SDXL_EXAMPLE / "toy"
IMAGES = SDXL_EXAMPLE / "images"


# -- metrics on hand-built images ----------------------------------------------------------------------------------
def test_scenes_are_read_back_exactly_and_are_deterministic():
    scenes = random_scenes(60, seed=5)
    assert scenes == random_scenes(60, seed=5) and scenes != random_scenes(60, seed=6)
    assert {s.shape for s in scenes} == {"circle", "square", "triangle"} and len({s.colour for s in scenes}) == 6
    for scene in scenes:
        reading = classify_scene(draw_scene(scene))
        assert (reading.background, reading.colour, reading.shape) == (scene.background, scene.colour, scene.shape)
        assert reading.background_share > 0.75 and reading.colour_share > 0.95


def test_prompt_fidelity_scores_what_the_prompt_names():
    image = draw_scene(Scene("circle", "red", "blue", 16, 16, 9))
    assert named_colours("a red circle on a blue background") == ("red", "blue", "circle")
    assert named_colours("a photo of sks toy on a green background") == (None, "green", None)
    assert prompt_fidelity(image, "a red circle on a blue background") == 1.0
    assert prompt_fidelity(image, "a photo of sks toy on a blue background") == 1.0
    assert prompt_fidelity(image, "a green square on a yellow background") == 0.0
    half = prompt_fidelity(image, "a red square on a blue background")  # right colours, wrong shape
    assert half == pytest.approx(2 / 3)
    half_bg = np.asarray(image).copy()
    half_bg[:, :16] = PALETTE["yellow"]  # left half of the frame turns yellow
    assert 0.4 < prompt_fidelity(half_bg, "a photo of sks toy on a blue background") < 0.6
    with pytest.raises(ValueError, match="names no palette colour"):
        prompt_fidelity(image, "a photo of sks toy")


def test_subject_similarity_rewards_stripes_and_ignores_background_and_position():
    refs = load_reference_images(IMAGES)
    assert len(refs) == 5 and all(r.shape == (32, 32, 3) for r in refs)
    striped = [draw_subject((32, 32), PALETTE[bg], (cx, 14), 8, band=6) for bg, cx in (("green", 12), ("purple", 20))]
    plain_red = draw_scene(Scene("circle", "red", "green", 16, 14, 8))
    plain_white = draw_scene(Scene("circle", "red", "blue", 16, 14, 8)).point(lambda v: 250)  # all white: no subject
    scores = [subject_similarity([img], refs) for img in striped]
    assert min(scores) > 0.7 and abs(scores[0] - scores[1]) < 0.1  # background and position do not matter
    assert subject_similarity([plain_red], refs) < 0.35  # right red, but no white and no stripes
    assert subject_similarity([plain_white], refs) == 0.0  # nothing stands out from the frame
    assert subject_similarity(refs, refs) > 0.7


# -- the instance photos -------------------------------------------------------------------------------------------
def test_instance_photos_show_a_subject_the_toy_world_never_draws():
    refs = load_reference_images(IMAGES)
    for ref in refs:
        pixels = ref.reshape(-1, 3).astype(int)
        red = (np.abs(pixels - (220, 30, 40)).sum(1) < 60).mean()
        white = (np.abs(pixels - (250, 250, 250)).sum(1) < 30).mean()
        assert red > 0.05 and white > 0.03  # red and white stripes; white is no palette colour
    world = np.stack([np.asarray(draw_scene(s)) for s in random_scenes(200, seed=0)]).reshape(-1, 3).astype(int)
    assert (np.abs(world - (250, 250, 250)).sum(1) < 30).sum() == 0


# -- the committed toy pipeline ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(TOY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_pipeline_is_small_sdxl_in_hub_layout():
    index = json.loads((TOY / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    weights = sorted(p.relative_to(TOY).as_posix() for p in TOY.rglob("*.safetensors"))
    assert weights == [f"{c}/{n}.safetensors" for c, n in (("text_encoder", "model"), ("text_encoder_2", "model"),
                       ("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"))]  # fmt: skip
    assert sum(p.stat().st_size for p in TOY.rglob("*") if p.is_file()) < 20e6
    unet_config = json.loads((TOY / "unet" / "config.json").read_text())
    assert unet_config["addition_embed_type"] == "text_time"


def test_toy_pipeline_follows_colour_and_background_prompts(toy_pipe):
    prompts = ["a red circle on a blue background", "a blue square on a yellow background"]
    for prompt in prompts:
        colour, background, _ = named_colours(prompt)
        with torch_threads(min(torch.get_num_threads(), 2)):
            images = toy_pipe([prompt] * 2, height=32, width=32, num_inference_steps=20, guidance_scale=5.0,
                              generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # fmt: skip
        for image in images:
            reading = classify_scene(image)
            assert reading.background == background and reading.background_share > 0.7, (prompt, reading)
            assert reading.colour == colour and reading.colour_share > 0.5, (prompt, reading)  # mostly the named colour
            assert reading.shape_pixels > 30


# -- the toy default of train.py -------------------------------------------------------------------------------------
def _train_script() -> ModuleType:
    return example_module(SDXL_EXAMPLE / "train.py", "sdxl_example_train")


def test_no_argument_default_resolves_to_the_toy_files_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = _train_script()
    config, toy = train.parse([])
    assert toy and config.model == str(TOY.resolve()) and config.instance_data_dir == str(IMAGES.resolve())
    assert (TOY / "model_index.json").is_file() and config.resolution == 32 and config.instance_prompt
    config, toy = train.parse(["--max_steps", "7", "--adapter", "lora"])  # other flags keep the toy default
    assert toy and config.max_steps == 7 and config.adapter == "lora" and config.model == str(TOY.resolve())
    for argv in (["--model", "stabilityai/stable-diffusion-xl-base-1.0"], ["--model=x"], []):
        config, toy = train.parse([*argv, "--instance_data_dir", "dog/", "--instance_prompt", "a photo of sks dog"])
        assert not toy and (config.resolution, config.max_steps, config.learning_rate) == (1024, 500, 1e-4)
    assert config.model == "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.mark.slow
def test_short_toy_dreambooth_run_moves_towards_the_subject_and_writes_the_grid(tmp_path, one_thread):
    from nara_diffusion.image.dreambooth import DreamBoothConfig
    from nara_diffusion.toy.dreambooth import run_toy_dreambooth, toy_dreambooth_defaults

    settings = toy_dreambooth_defaults(TOY, IMAGES)
    settings.update(with_prior_preservation=False, validation_prompt=None, report_to="none",
                    output_dir=str(tmp_path / "run"))  # fmt: skip
    report = run_toy_dreambooth(DreamBoothConfig(**settings), seeds=(0, 1))
    assert report.before.subject < 0.02 and report.before.context_prompt > 0.9  # the base knows backgrounds only
    assert report.after.subject > 0.1 > 20 * report.before.subject  # the default 300 updates; 100 are not enough
    assert report.global_step == 300 and (report.final_dir / "nara_weights.safetensors").is_file()
    from PIL import Image

    assert Image.open(report.grid).size == (2 * 128, 4 * 128)  # 2 seeds; 4 rows: before/after × 2 prompts
