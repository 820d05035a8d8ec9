"""DreamBooth on SD3 and Flux: the flow-matching objective against an independent computation, λ = σ per training
example, two-step runs per family whose adapters reload exactly into stock pipelines, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from builders import dreambooth_config, generate, perturb_, tiny_flux_pipeline, tiny_sd3_pipeline
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from reference import f32_tol

import nara_diffusion as nd
from nara_diffusion.image.dreambooth import run_dreambooth
from nara_diffusion.image.flow_matching import FlowMatchingModel

STOCK = {"sd3": (tiny_sd3_pipeline, StableDiffusion3Pipeline), "flux": (tiny_flux_pipeline, FluxPipeline)}


def _stock(family: str):
    make, cls = STOCK[family]
    pipe = cls(**make().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lambdas(transformer) -> list[dict]:
    calls: list[dict] = []
    transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append({"t": k["timestep"].detach().clone()}), with_kwargs=True, prepend=True
    )
    nd.get_adapter(transformer).embedding.register_forward_hook(lambda m, i, o: calls[-1].update(lam=i[0].clone()))
    return calls


@pytest.mark.parametrize(("family", "scheme"), [("sd3", "logit_normal"), ("flux", "cosmap")])
def test_the_loss_is_diffusers_flow_matching_objective(family, scheme):
    pipe = _stock(family)
    nd.image.inject_nara(pipe.transformer, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    perturb_(pipe.transformer, scale=0.05)
    calls = _lambdas(pipe.transformer)
    gen = torch.Generator().manual_seed(3)
    seq, width, pooled_dim = (5, 32, 32)
    embeds, pooled = torch.randn(2, seq, width, generator=gen), torch.randn(2, pooled_dim, generator=gen)
    text_ids = torch.zeros(seq, 3) if family == "flux" else None
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    shift, scale, weight = 0.1, 1.5, 0.7
    model = FlowMatchingModel(
        pipe.transformer,
        scheduler,
        family=family,
        prompt_embeds=embeds,
        pooled_embeds=pooled,
        text_ids=text_ids,
        latent_shift=shift,
        latent_scale=scale,
        vae_scale_factor=8,
        prior_loss_weight=weight,
        weighting_scheme=scheme,
        guidance_scale=3.5,
    )
    batch = {
        "latent_mean": torch.randn(3, 4, 8, 8, generator=gen),
        "latent_std": torch.rand(3, 4, 8, 8, generator=gen) * 0.1,
        "is_class": torch.tensor([False, True, False]),
    }
    with torch.no_grad():
        loss = model(batch, torch.Generator().manual_seed(7))

        # the same draws, in the same order, through the formulas of SD3's paper and diffusers' scripts
        g = torch.Generator().manual_seed(7)
        x0 = (batch["latent_mean"] + batch["latent_std"] * torch.randn(3, 4, 8, 8, generator=g) - shift) * scale
        eps = torch.randn(3, 4, 8, 8, generator=g)
        u = (
            torch.sigmoid(torch.normal(0.0, 1.0, (3,), generator=g))
            if scheme == "logit_normal"
            else torch.rand(3, generator=g)
        )
        index = (u * 1000).long()
        sigma, t = scheduler.sigmas[index], scheduler.timesteps[index]
        torch.testing.assert_close(t, sigma * 1000)  # the shifted schedule: t = σ·T
        s = sigma.view(3, 1, 1, 1)
        noisy = (1 - s) * x0 + s * eps
        which = torch.tensor([0, 1, 0])
        if family == "sd3":
            v = pipe.transformer(
                hidden_states=noisy, timestep=t, encoder_hidden_states=embeds[which], pooled_projections=pooled[which]
            ).sample
            residual = (noisy - s * v) - x0  # preconditioned: x̂₀ = x_σ − σ·v̂ against x₀
            weighting = torch.ones(3)
        else:
            packed = FluxPipeline._pack_latents(noisy, 3, 4, 8, 8)
            v = pipe.transformer(
                hidden_states=packed,
                timestep=t / 1000,
                guidance=torch.full((3,), 3.5),
                pooled_projections=pooled[which],
                encoder_hidden_states=embeds[which],
                txt_ids=text_ids,
                img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32),
            ).sample
            residual = FluxPipeline._unpack_latents(v, 64, 64, 8) - (eps - x0)
            weighting = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))  # cosmap
        per_example = weighting * residual.pow(2).mean(dim=(1, 2, 3))
        expected = per_example[[0, 2]].mean() + weight * per_example[1]
    # the same operations in another grouping: float32 rounding of 256-term means of values ≈ 1-10
    torch.testing.assert_close(loss, expected, rtol=0, atol=f32_tol(256, magnitude=float(expected)))
    # λ = σ of each example (SD3: t/1000; Flux: the t/1000 it is handed), two float32 roundings of values ≤ 1
    torch.testing.assert_close(calls[0]["lam"], sigma, rtol=0, atol=f32_tol(2))
    assert len(set(sigma.tolist())) == 3


@pytest.mark.parametrize(("family", "adapter"), [("sd3", "nara"), ("flux", "nara"), ("flux", "lora")])
def test_two_step_dreambooth_reloads_exactly_into_a_stock_pipeline(tmp_path, family, adapter):
    pipe = _stock(family)
    config = dreambooth_config(
        tmp_path,
        max_steps=2,
        batch_size=2,
        adapter=adapter,
        with_prior_preservation=True,
        class_prompt="a photo of toy",
        num_class_images=2,
    )
    result = run_dreambooth(config, pipe)
    assert result.global_step == 2
    final = result.final_dir
    fresh = _stock(family)
    base = generate(fresh)
    if adapter == "lora":
        fresh.load_lora_weights(final)
    else:
        fresh.load_nara_weights(final)
        record = json.loads((final / "nara_config.json").read_text())["denoiser"]
        assert record["family"] == family and record["component"] == "transformer"
    trained = generate(pipe)
    assert (generate(fresh) == trained).all() and not (trained == base).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_sees_sigma_per_example(tmp_path, family, monkeypatch):
    from nara_diffusion.image import dreambooth

    pipe = _stock(family)
    seen: list[dict] = []
    original = dreambooth.attach_adapters

    def attach(*args, **kwargs):
        original(*args, **kwargs)
        seen.append(_lambdas(pipe.transformer))

    monkeypatch.setattr(dreambooth, "attach_adapters", attach)
    run_dreambooth(dreambooth_config(tmp_path, max_steps=2, batch_size=2), pipe)
    calls = seen[0]
    assert len(calls) == 2
    for call in calls:
        sigma = call["t"] / (1000 if family == "sd3" else 1)  # SD3 is handed σ·1000, Flux σ
        assert call["lam"].shape == (2,) and call["lam"][0] != call["lam"][1]
        torch.testing.assert_close(call["lam"], sigma, rtol=0, atol=f32_tol(1))
        assert bool(((sigma > 0) & (sigma <= 1)).all())


def test_flux_refuses_text_encoder_training_before_any_work(tmp_path):
    config = dreambooth_config(tmp_path, train_text_encoder=True)
    with pytest.raises(ValueError, match="--train_text_encoder"):
        run_dreambooth(config, _stock("flux"))
    assert not (tmp_path / "run").exists()


def test_sd3_training_encodes_each_prompt_as_the_pipeline_does_at_the_examples_lambda(tmp_path):
    from nara_diffusion.image.dreambooth import attach_adapters, recipe_for

    pipe = _stock("sd3")
    config = dreambooth_config(tmp_path, train_text_encoder=True, class_prompt="a photo of toy")
    recipe, encoders = recipe_for(pipe), [pipe.text_encoder, pipe.text_encoder_2]
    attach_adapters(config, pipe.transformer, encoders, pipe.scheduler, target_modules=recipe.targets(config))
    perturb_(*encoders[:1], seed=3)
    perturb_(encoders[1], seed=4)
    model = recipe.model(config, encoders, pipe.vae)
    t = torch.tensor([900.0, 200.0])
    with torch.no_grad():
        embeds, pooled = model.encode_prompts(torch.tensor([0, 1]), t)
        for i, prompt in enumerate([config.instance_prompt, config.class_prompt]):
            with nd.noise_level(encoders[0], t[i]), nd.noise_level(encoders[1], t[i]):
                expected, _, expected_pooled, _ = pipe.encode_prompt(
                    prompt, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False
                )
            # batch of 2 vs 1 (another GEMM blocking): ≈ 45 chained reductions of ≤ 37 terms (2 CLIP layers with
            # the NaRA branch, the T5 of the cache), values of the size of the largest embedding
            tol = f32_tol(37, magnitude=float(expected.abs().max()), depth=45)
            torch.testing.assert_close(embeds[i], expected[0], rtol=0, atol=tol)
            torch.testing.assert_close(pooled[i], expected_pooled[0], rtol=0, atol=tol)
        other, _ = model.encode_prompts(torch.tensor([0, 1]), t.flip(0))  # each example's own λ matters
    assert (other[0] - embeds[0]).abs().max() > 100 * tol


def test_sd3_dreambooth_with_text_encoders_reloads_exactly(tmp_path):
    pipe = _stock("sd3")
    config = dreambooth_config(tmp_path, max_steps=2, train_text_encoder=True, text_encoder_lr=1e-2)
    result = run_dreambooth(config, pipe)
    _, configs = nd.image.read_nara_weights(result.final_dir)
    assert set(configs) == {"transformer", "text_encoder", "text_encoder_2"}
    pipe.get_nara_adapters()  # the trained pipeline, as a loader pipeline (re-encodes the prompt per step)
    pipe._sync_prompt_encoding()
    fresh = _stock("sd3")
    base = generate(fresh)
    fresh.load_nara_weights(result.final_dir)
    trained = generate(pipe)
    assert (generate(fresh) == trained).all() and not (trained == base).all()
