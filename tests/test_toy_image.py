"""The toy image world: scene metrics on images whose answer is known, the committed toy pipeline still following its
prompts, the subject's instance photos, and the toy default of examples/sdxl_dreambooth/train.py."""

from __future__ import annotations

import json
from types import ModuleType

import numpy as np
import pytest
import torch
from builders import SDXL_EXAMPLE, example_module, torch_threads
from PIL import Image

from nara_diffusion.toy.dreambooth import labelled_grid
from nara_diffusion.toy.image import (
    PALETTE,
    WHITE,
    Scene,
    background_colour,
    classify_scene,
    draw_scene,
    draw_subject,
    foreground_mask,
    load_reference_images,
    named_colours,
    prompt_fidelity,
    random_scenes,
    stripes,
    subject_similarity,
)
from nara_diffusion.toy.image_pretrain import vae_reconstructions

TOY = SDXL_EXAMPLE / "toy"
IMAGES = SDXL_EXAMPLE / "images"


# -- metrics on hand-built images ----------------------------------------------------------------------------------
def test_scenes_are_read_back_exactly_and_are_deterministic():
    scenes = random_scenes(60, seed=5)
    assert scenes == random_scenes(60, seed=5) and scenes != random_scenes(60, seed=6)
    assert {s.shape for s in scenes} == {"circle", "square", "triangle"} and len({s.colour for s in scenes}) == 6
    assert 10 < sum(s.band > 0 for s in scenes) < 30  # about a third striped
    for scene in scenes:
        reading = classify_scene(draw_scene(scene))
        assert (reading.background, reading.colour, reading.shape) == (scene.background, scene.colour, scene.shape)
        assert reading.background_share > 0.75
        # plain: all the shape colour; striped: bands of it and white (at least one band in two)
        assert reading.colour_share > 0.95 if not scene.band else 0.3 < reading.colour_share < 0.8
    assert Scene("circle", "red", "blue", 16, 16, 9, band=5).caption(1) == (
        "a photo of a striped red circle on a blue background"
    )


def test_stripes_alternate_the_colour_and_white_with_a_colour_band_through_the_centre():
    bands = stripes((12, 2), cx=5, colour=(1, 2, 3), band=3)
    assert bands.shape == (2, 12, 3) and (bands[0] == bands[1]).all()
    is_colour = [tuple(p) == (1, 2, 3) for p in bands[0]]
    # columns 4-6 hold the central band (5 - 3 // 2 = 4), then white 7-9, colour 10-11; white 1-3, colour 0
    assert is_colour == [True, False, False, False, True, True, True, False, False, False, True, True]
    assert all(tuple(p) == WHITE for p, c in zip(bands[0], is_colour, strict=True) if not c)


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
    other_stripes = draw_scene(Scene("circle", "blue", "green", 16, 14, 8, band=5))
    assert subject_similarity([other_stripes], refs) < min(scores) - 0.2  # white stripes, but not red ones
    assert subject_similarity([plain_white], refs) == 0.0  # nothing stands out from the frame
    # every photo reads as the subject, also the one whose ball touches the frame (it scored 0.55 when every frame
    # colour counted as background)
    assert min(subject_similarity([ref], refs) for ref in refs) > 0.8


def _ball(centre: tuple[int, int] = (16, 16), radius: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """The subject drawn at 32 px on blue and its true ``[32, 32]`` mask."""
    yy, xx = np.mgrid[0:32, 0:32]
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius * radius
    return np.asarray(draw_subject((32, 32), PALETTE["blue"], centre, radius, band=6)), inside


def test_the_foreground_is_what_differs_from_the_frames_majority_colour_even_in_a_noisy_frame():
    refs = load_reference_images(IMAGES)
    clean, inside = _ball()
    assert (foreground_mask(clean) == inside).all()
    assert np.array_equal(background_colour(clean), np.array(PALETTE["blue"], dtype=np.float32))
    # A generated picture's frame is noisy: a few frame pixels in the subject's own colours, the rest jittered.
    # Counting every frame colour as background would drop the ball's red and white (the misreading of issue 15).
    noisy = clean.astype(np.int64) + np.random.default_rng(0).integers(-12, 13, size=clean.shape)
    noisy[0, 3], noisy[31, 20], noisy[5, 0] = (250, 250, 250), (220, 30, 40), (250, 250, 250)
    noisy = noisy.clip(0, 255).astype(np.uint8)
    assert np.abs(background_colour(noisy) - PALETTE["blue"]).max() <= 4  # the median of the jittered frame
    mask = foreground_mask(noisy)
    assert (mask[inside]).all() and mask[~inside].sum() == 3  # the ball, plus the three odd frame pixels
    assert subject_similarity([noisy], refs) > subject_similarity([clean], refs) - 0.05
    # a ball that touches the frame (as in a cropped photo) keeps all its pixels: the frame is still mostly blue
    cut, inside = _ball(centre=(24, 16), radius=9)
    assert (foreground_mask(cut) == inside).all()
    # a frame far from every palette colour: its commonest quantised colour is the background
    grey = np.where(inside[..., None], cut, np.uint8(128))
    assert np.array_equal(background_colour(grey), np.full(3, 128, dtype=np.float32))
    assert (foreground_mask(grey) == inside).all()


# -- the instance photos -------------------------------------------------------------------------------------------
def test_instance_photos_show_red_and_white_stripes_which_the_toy_world_draws_only_on_striped_shapes():
    refs = load_reference_images(IMAGES)
    for ref in refs:
        pixels = ref.reshape(-1, 3).astype(int)
        red = (np.abs(pixels - (220, 30, 40)).sum(1) < 60).mean()
        white = (np.abs(pixels - WHITE).sum(1) < 30).mean()
        assert red > 0.05 and white > 0.03  # red and white stripes; white is no palette colour
    for scene in random_scenes(100, seed=0):
        white = (np.abs(np.asarray(draw_scene(scene)).astype(int) - WHITE).sum(-1) < 30).sum()
        assert (white > 0) == (scene.band > 0), scene


def test_labelled_grid_places_every_tile_and_writes_every_title():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(10, 10, 10), (200, 200, 0), (0, 200, 200)]]
    rows = [[Image.new("RGB", (3, 2), c) for c in row] for row in colours]
    grid = np.asarray(labelled_grid(rows, ["before", "after:\nline two"], ["a", "b", "c"], zoom=5, gap=4))
    tiles = {tuple(int(v) for v in grid[y, x]) for y in range(grid.shape[0]) for x in range(grid.shape[1])}
    assert all(c in tiles for row in colours for c in row)
    first_ys, first_xs = np.nonzero((grid == colours[0][0]).all(-1))
    left, top = first_xs.min(), first_ys.min()
    # each tile is a 15 x 10 block of its colour; tiles share a column layout and are 4 px apart
    for i, row in enumerate(colours):
        for j, colour in enumerate(row):
            ys, xs = np.nonzero((grid == colour).all(-1))
            assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, len(ys)) == (10, 15, 150)
            assert (xs.min() - left, ys.min() - top) == (j * (15 + 4), i * (10 + 4))
    dark = grid.sum(-1) < 200
    assert dark[:top, left:].any()  # column titles above the tiles
    assert dark[top : top + 10, :left].any() and dark[top + 14 : top + 24, :left].any()  # a title per row
    with pytest.raises(ValueError, match="row titles"):
        labelled_grid(rows, ["only one"], ["a", "b", "c"])


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


def _non_subject_scores(refs) -> tuple[float, float]:
    """`subject_similarity` of a plain red ball (the subject's red, no white, no stripes) and of a blue-and-white
    striped one (stripes, wrong colour): what an image that is not the subject can score."""
    plain = subject_similarity([draw_scene(Scene("circle", "red", "green", 16, 16, 9))], refs)
    other = subject_similarity([draw_scene(Scene("circle", "blue", "green", 16, 16, 9, band=5))], refs)
    return plain, other


def test_toy_vae_keeps_the_subjects_stripes_and_the_base_draws_striped_shapes(toy_pipe):
    refs = load_reference_images(IMAGES)
    plain, other = _non_subject_scores(refs)
    with torch_threads(min(torch.get_num_threads(), 2)):
        # the codec keeps what sets the subject apart: its reconstructions beat anything that is not the subject
        assert subject_similarity(vae_reconstructions(toy_pipe.vae, refs), refs) > max(plain, other)
        prompt = "a striped red circle on a blue background"
        images = toy_pipe([prompt] * 2, height=32, width=32, num_inference_steps=20, guidance_scale=5.0,
                          generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # fmt: skip
    assert subject_similarity(images, refs) > plain  # more than a red ball: white and red-white pairs, from words
    assert all(classify_scene(image).background == "blue" for image in images)


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
def test_the_toy_default_run_learns_the_subject_keeps_backgrounds_and_writes_a_labelled_grid(tmp_path, one_thread):
    from nara_diffusion.image.dreambooth import DreamBoothConfig
    from nara_diffusion.toy.dreambooth import run_toy_dreambooth, toy_dreambooth_defaults

    settings = toy_dreambooth_defaults(TOY, IMAGES)
    settings.update(validation_prompt=None, report_to="none", output_dir=str(tmp_path / "run"))
    report = run_toy_dreambooth(DreamBoothConfig(**settings), seeds=(0, 1))
    refs = load_reference_images(IMAGES)
    # Margins from the metric itself: what hand-drawn balls that are not the subject score. A plain red one has the
    # subject's red without its white and red-white pairs (0.31); a blue-and-white striped one has stripes of the
    # wrong colour (0.43); drawings of the subject score 0.89, generated pictures of it 0.5-0.7.
    plain, other = _non_subject_scores(refs)
    assert report.before.subject < plain  # the base draws no red-and-white stripes for "sks toy"
    assert report.after.subject > plain  # on average the pictures are nearer the subject than a red ball is
    assert max(report.after.per_image["subject"]) > max(plain, other)  # and one shows what only the subject scores
    # the other-background prompts keep their background: every picture's frame is mostly the named colour (what
    # classify_scene reads back; the fine-tune that broke the model matched 0.24 of the frame)
    for scores in (report.before, report.after):
        n = len(scores.instance_images)
        for k, image in enumerate(scores.context_images):
            assert classify_scene(image).background == named_colours(scores.prompts[1 + k // n])[1], (k, scores)
    assert report.global_step == settings["max_steps"] and (report.final_dir / "nara_weights.safetensors").is_file()
    grid = Image.open(report.grid)
    contexts = len(report.after.prompts) - 1
    assert grid.height > 2 * (1 + contexts) * 128 and grid.width > 2 * 128  # 2 seeds; before/after per prompt + titles


@pytest.mark.slow
def test_image_benchmark_quick_mode_writes_its_tables_and_skips_finished_runs(tmp_path, monkeypatch, one_thread):
    bench = example_module(SDXL_EXAMPLE.parents[1] / "benchmarks" / "quality_image.py", "bench_quality_image")
    table = bench.run([0], [0], tmp_path, quick=True, progress=False)
    names = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")]
    assert names[:5] == ["method", "base model (no fine-tuning)", "LoRA (peft)", names[3], "NaRA"]
    assert names[3].startswith("LoRA (peft), r=") and "NaRA-C" in names
    assert (tmp_path / "quality_image_quick.md").read_text() == table
    assert Image.open(tmp_path / "quality_image_grid_quick.png").height > 5 * 96  # base + 4 methods
    runs = sorted(p.name for p in (tmp_path / "quality_image_runs_quick").iterdir() if p.name != "work")
    assert len(runs) == 5  # the base and 4 (method, seed) runs, each with every picture it made
    for name in runs:  # one row per prompt ("sks toy", on green, on yellow), one column per sampling seed
        assert Image.open(tmp_path / "quality_image_runs_quick" / name / "pictures.png").size == (32, 3 * 32)
    calls = []
    monkeypatch.setattr(bench, "run_toy_dreambooth", lambda *a, **k: calls.append(a))
    assert bench.run([0], [0], tmp_path, quick=True, progress=False) == table and not calls  # all cached
