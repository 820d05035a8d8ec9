"""DreamBooth: images and bad folders, the objective, end-to-end runs (NaRA, text encoders + prior, LoRA)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builders import SDXL_EXAMPLE, dreambooth_config, generate, tiny_sd_pipeline, tiny_sdxl_pipeline
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from PIL import Image
from reference import f32_tol

import nara_diffusion as nd
from nara_diffusion.core import NoiseConditionedAdapter
from nara_diffusion.image.data import DreamBoothDataset, collate_dreambooth
from nara_diffusion.image.dreambooth import (
    DreamBoothConfig,
    DreamBoothModel,
    encode_tokens,
    run_dreambooth,
    tokenize,
)
from nara_diffusion.training import load_config

IMAGES = SDXL_EXAMPLE / "images"


# -- images ---------------------------------------------------------------------------------------------------
def test_images_of_any_size_and_mode_become_rgb_squares_with_their_micro_conditioning():
    files = sorted(IMAGES.iterdir())
    assert len(files) == 5 and {Image.open(f).mode for f in files} == {"RGB", "RGBA", "P"}
    data = DreamBoothDataset(IMAGES, 64, center_crop=True)
    assert len(data) == 5 and data.instance_paths == files
    for path, item in zip(files, data.instance, strict=True):
        width, height = Image.open(path).size
        assert item.pixels.shape == (3, 64, 64) and item.pixels.dtype == torch.float32
        assert -1.0 <= float(item.pixels.min()) and float(item.pixels.max()) <= 1.0
        assert item.original_size == (height, width)
    # toy_1 is 96×72: resized to 85×64, centre crop starts 10 pixels from the left
    assert data.instance[1].crop_top_left == (0, 10)
    assert data.instance[4].crop_top_left == (16, 0)  # 64×96 → 64×96, 16 from the top
    red = data.instance[0].pixels[:, 34, 32]  # the striped ball sits in the middle of toy_0
    assert (red[0] > 0.5 and red[1] < 0) or red.min() > 0.9

    crops = [DreamBoothDataset(IMAGES, 64, seed=s).instance[1].crop_top_left for s in range(6)]
    assert all(top == 0 and 0 <= left <= 21 for top, left in crops) and len(set(crops)) > 1
    assert crops == [DreamBoothDataset(IMAGES, 64, seed=s).instance[1].crop_top_left for s in range(6)]
    plain = DreamBoothDataset(IMAGES, 64, center_crop=True)
    mirrored = 0
    for seed in range(4):
        flipped = DreamBoothDataset(IMAGES, 64, center_crop=True, random_flip=True, seed=seed)
        for i in (0, 3):  # square files: the centre crop is the whole (resized) image
            a, b = flipped.instance[i].pixels, plain.instance[i].pixels
            assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
            mirrored += torch.equal(a, b.flip(-1))
    assert 0 < mirrored < 8


def test_bad_instance_folders_and_settings_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DreamBoothDataset(tmp_path / "nope", 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        DreamBoothDataset(tmp_path / "empty", 64)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"holds no image.*readme\.txt"):
        DreamBoothDataset(notes, 64)
    mixed = tmp_path / "mixed"
    shutil.copytree(IMAGES, mixed)
    (mixed / "captions.txt").write_text("a photo")
    with pytest.warns(UserWarning, match=r"Skipping 1 non-image.*captions\.txt"):
        assert len(DreamBoothDataset(mixed, 64)) == 5
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"broken\.png is not a readable image"):
        DreamBoothDataset(mixed, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        DreamBoothDataset(IMAGES, 60)
    args = ["--instance_data_dir", str(IMAGES), "--instance_prompt", "a photo of sks toy"]
    with pytest.raises(ValueError, match="multiple of 8"):
        load_config(DreamBoothConfig, [*args, "--resolution", "1020"])
    with pytest.raises(ValueError, match="adapter must be one of nara, nara-c, lora"):
        load_config(DreamBoothConfig, [*args, "--adapter", "dora"])
    with pytest.raises(ValueError, match="needs --class_prompt"):
        load_config(DreamBoothConfig, [*args, "--with_prior_preservation"])  # a bare flag means true
    with pytest.raises(ValueError, match="No instance prompt"):
        load_config(DreamBoothConfig, ["--instance_data_dir", str(IMAGES)])
    cfg = load_config(DreamBoothConfig, args)  # the diffusers recipe's defaults
    assert (cfg.r, cfg.learning_rate, cfg.max_steps, cfg.lr_schedule, cfg.batch_size, cfg.grad_accum) == (
        4,
        1e-4,
        500,
        "constant",
        1,
        4,
    )


# -- the objective ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_sdxl_pipeline, tiny_sd_pipeline], ids=["sdxl", "sd15"])
def test_training_prompt_encoding_is_the_pipelines(make):
    pipe = make()
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if hasattr(pipe, "tokenizer_2") else [])
    prompts = ["a photo of sks toy", "a photo of a toy in the snow"]
    with torch.no_grad():
        embeds, pooled = encode_tokens(encoders, [tokenize(t, prompts) for t in tokenizers], len(encoders) == 2)
        reference = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert torch.equal(embeds, reference[0])
    if len(encoders) == 2:
        assert torch.equal(pooled, reference[2])
    else:
        assert pooled is None


class _ZeroUNet(torch.nn.Module):
    """Predicts zeros and records what it was given (the loss is then the mean square of the target)."""

    config = SimpleNamespace(addition_embed_type="text_time")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        self.calls.append({"timestep": timestep, "hidden": encoder_hidden_states, **added_cond_kwargs})
        return (torch.zeros_like(sample),)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_loss_is_the_dreambooth_objective(prediction_type, snr_gamma):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.register_to_config(prediction_type=prediction_type)
    unet = _ZeroUNet()
    embeds, pooled = torch.randn(2, 7, 64), torch.randn(2, 32)
    model = DreamBoothModel(
        unet, scheduler, resolution=64, prior_loss_weight=0.7, snr_gamma=snr_gamma,
        latent_scale=torch.tensor(0.13), prompt_embeds=embeds, pooled_embeds=pooled,
    )  # fmt: skip
    data = DreamBoothDataset(IMAGES, 64, center_crop=True, class_dir=IMAGES, num_class_images=2)
    data.encode_latents(lambda px: (px[:, :4, ::8, ::8] * 0.5, torch.full_like(px[:, :4, ::8, ::8], 0.1)))
    batch = collate_dreambooth([data[1], data[2]])
    assert batch["is_class"].tolist() == [False, False, True, True]
    loss = model(batch, torch.Generator().manual_seed(3))

    gen = torch.Generator().manual_seed(3)  # replay the draws: latent sample, noise, timesteps
    mean, std = batch["latent_mean"], batch["latent_std"]
    latents = (mean + std * torch.randn(mean.shape, generator=gen)) * 0.13
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    per_example = target.pow(2).mean(dim=(1, 2, 3))
    weights = torch.ones(4)
    if snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod[t]
        snr = alpha_bar / (1 - alpha_bar)
        weights = torch.minimum(snr, torch.tensor(snr_gamma)) / snr + (prediction_type == "v_prediction")
    expected = (per_example[:2] * weights[:2]).mean() + 0.7 * per_example[2:].mean()
    torch.testing.assert_close(loss, expected)

    call = unet.calls[0]
    assert torch.equal(call["timestep"], t)
    assert torch.equal(call["hidden"], embeds[[0, 0, 1, 1]]) and torch.equal(call["text_embeds"], pooled[[0, 0, 1, 1]])
    # micro-conditioning: original (h, w), crop (top, left), target (64, 64); instances toy_1 (96×72) and
    # toy_2 (72×64), then class images 1 and 0 (the class folder's first two: toy_1 and toy_0, 64×64)
    expected_ids = [[72, 96, 0, 10, 64, 64], [64, 72, 0, 4, 64, 64], [72, 96, 0, 10, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert call["time_ids"].tolist() == expected_ids


# -- whole runs --------------------------------------------------------------------------------------------------
@pytest.fixture
def record_lambdas(monkeypatch):
    """Every λ a NaRA hypernetwork is handed while gradients are on (training forwards), per adapter instance."""
    seen: list[tuple[int, torch.Tensor]] = []
    original = NoiseConditionedAdapter.begin_forward

    def begin_forward(self, lam):
        if torch.is_grad_enabled() and lam is not None:
            seen.append((id(self), lam.detach().clone()))
        return original(self, lam)

    monkeypatch.setattr(NoiseConditionedAdapter, "begin_forward", begin_forward)
    return seen


def _record_timesteps(unet) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def before(module, args, kwargs):
        if torch.is_grad_enabled():
            seen.append(torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None)).clone())

    unet.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
    return seen


def test_nara_dreambooth_trains_logs_and_its_adapter_reloads_exactly(tmp_path, record_lambdas):
    pipe = tiny_sdxl_pipeline()
    base = generate(pipe)
    timesteps = _record_timesteps(pipe.unet)
    config = dreambooth_config(
        tmp_path,
        validation_prompt="a photo of sks toy on the beach",
        validation_steps=2,
        num_validation_images=2,
        report_to="tensorboard",
    )
    result = run_dreambooth(config, pipe=pipe)
    assert result.global_step == 3 and sorted(p.name for p in result.final_dir.iterdir()) == [
        "README.md",
        "nara_config.json",
        "nara_weights.safetensors",
        "training_config.json",
    ]
    # λ of every training forward is t/T of that forward's timesteps, per example
    assert len(record_lambdas) == len(timesteps) == 3
    for (_, lam), t in zip(record_lambdas, timesteps, strict=True):
        assert lam.shape == t.shape == (1,)
        torch.testing.assert_close(lam, t.float() / 1000)
    # only the adapter trained; the output moved; a fresh stock pipeline reproduces it exactly
    fresh = tiny_sdxl_pipeline()
    base_weights = fresh.unet.state_dict()
    for key, value in pipe.unet.state_dict().items():
        if "nara_" not in key:
            assert torch.equal(value, base_weights[key.replace(".base_layer", "")]), key
    pipe.unet.eval()
    trained = generate(pipe)
    assert not (trained == base).all()
    nd.image.enable_nara_loading(fresh).load_nara_weights(result.final_dir)
    assert (generate(fresh) == trained).all()
    # validation grids at update 2 and after the last, and in TensorBoard
    grids = sorted((tmp_path / "run" / "validation").iterdir())
    assert [g.name for g in grids] == ["step-000002.png", "step-000003.png"]
    assert Image.open(grids[0]).size == (128, 64)
    assert not np.array_equal(np.asarray(Image.open(grids[0])), np.asarray(Image.open(grids[1])))
    if importlib.util.find_spec("tensorboard") is not None:  # the Trainer logs to log.jsonl only without it
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(tmp_path / "run" / "nara_diffusion"), size_guidance={"images": 0})
        assert [e.step for e in accumulator.Reload().Images("validation")] == [2, 3]
    recorded = json.loads((result.final_dir / "training_config.json").read_text())
    assert recorded["instance_prompt"] == "a photo of sks toy" and recorded["adapter"] == "nara"


def test_text_encoders_and_prior_preservation(tmp_path, record_lambdas):
    pipe = tiny_sdxl_pipeline()
    timesteps = _record_timesteps(pipe.unet)
    config = dreambooth_config(
        tmp_path,
        max_steps=2,
        train_text_encoder=True,
        text_encoder_lr=1e-2,
        with_prior_preservation=True,
        class_prompt="a photo of a toy",
        num_class_images=3,
        sample_batch_size=2,
        batch_size=2,
        gradient_checkpointing=True,
    )
    result = run_dreambooth(config, pipe=pipe)
    assert len(list((tmp_path / "run" / "class_images").glob("class-*.png"))) == 3
    # each training forward: the UNet and both text encoders got λ = t/T of the same 4 examples (2 + 2 class)
    assert len(timesteps) == 2 and len(record_lambdas) == 6
    for step, t in enumerate(timesteps):
        lams = record_lambdas[3 * step : 3 * step + 3]
        assert len({owner for owner, _ in lams}) == 3
        for _, lam in lams:
            assert lam.shape == (4,)
            torch.testing.assert_close(lam, t.float() / 1000)
    _, configs = nd.image.read_nara_weights(result.final_dir)
    assert set(configs) == {"unet", "text_encoder", "text_encoder_2"}
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    nd.image.enable_per_step_prompt_encoding(pipe)
    trained = generate(pipe)
    fresh = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    fresh.load_nara_weights(result.final_dir)
    assert (generate(fresh) == trained).all()


def test_lora_baseline_is_a_diffusers_lora(tmp_path):
    pipe = tiny_sdxl_pipeline()
    result = run_dreambooth(dreambooth_config(tmp_path, adapter="lora", max_steps=2), pipe=pipe)
    assert (result.final_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe.unet.eval()
    trained = generate(pipe)
    fresh = tiny_sdxl_pipeline()
    # diffusers rebuilds the same LoRA layers, but it is another code path: allow float32 rounding through the UNet and
    # VAE (~85 chained reductions of ≤ 576 terms; pixels in [0, 1]), and check the trained update moves pixels by far
    # more than that
    tol = f32_tol(576, magnitude=1.0, depth=85)
    assert np.abs(generate(fresh) - trained).max() > 10 * tol
    fresh.load_lora_weights(result.final_dir)  # diffusers' own loader
    np.testing.assert_allclose(generate(fresh), trained, rtol=0, atol=tol)
    assert isinstance(fresh, StableDiffusionXLPipeline)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes the mixed precision once per process; reset it around a test that needs another one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_mixed_precision_keeps_the_adapter_in_float32(tmp_path, fresh_accelerate_state):
    pipe = tiny_sdxl_pipeline()
    config = dreambooth_config(tmp_path, mixed_precision="bf16", train_text_encoder=True, max_steps=2)
    result = run_dreambooth(config, pipe=pipe)
    for module in (pipe.unet, pipe.text_encoder):
        dtypes = {("nara" if "nara_" in n else "base", p.dtype) for n, p in module.named_parameters()}
        assert dtypes == {("nara", torch.float32), ("base", torch.bfloat16)}
    assert pipe.unet.nara_hypernet["default"].embedding.W.dtype == torch.float32  # the Fourier buffer too
    assert pipe.vae.dtype == torch.float32  # SDXL's own VAE stays in float32
    state, _ = nd.image.read_nara_weights(result.final_dir)
    assert {v.dtype for v in state.values()} == {torch.float32}
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()[:2]]
    assert all(np.isfinite(losses))


def test_nara_c_learns_a_constant_core(tmp_path):
    pipe = tiny_sdxl_pipeline()
    result = run_dreambooth(dreambooth_config(tmp_path, adapter="nara-c", max_steps=2), pipe=pipe)
    core = pipe.unet.nara_hypernet["default"]
    assert core.kind == "constant" and float(core.constant.abs().sum()) > 0  # moved away from C = I
    assert json.loads((result.final_dir / "nara_config.json").read_text())["unet"]["core"] == "constant"
    pipe.unet.eval()
    fresh = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    fresh.load_nara_weights(result.final_dir)
    assert (generate(fresh) == generate(pipe)).all()
