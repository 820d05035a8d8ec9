"""`nd.image.inject_nara` on diffusers UNets and CLIP text encoders: targets, identity at init, λ = t/T per example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import generate, perturb_, tiny_sd_pipeline, tiny_sdxl_pipeline
from diffusers.models.attention_processor import Attention, AttnProcessor
from reference import f32_tol

import nara_diffusion as nd


def _record_lambdas(unet) -> list[dict]:
    """Per UNet call: its timestep, its batch size and the λ the shared hypernetwork received."""
    calls: list[dict] = []

    def before(module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        calls.append({"t": torch.as_tensor(timestep).float().reshape(-1), "batch": sample.shape[0]})

    unet.register_forward_pre_hook(before, with_kwargs=True, prepend=True)  # before the NaRA hook
    nd.get_adapter(unet).embedding.register_forward_hook(lambda m, i, o: calls[-1].__setitem__("lam", i[0].clone()))
    return calls


def test_inject_nara_wraps_every_attention_projection_and_leaves_processors_alone():
    pipe = tiny_sdxl_pipeline()
    unet = pipe.unet
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    processors = {name: id(p) for name, p in unet.attn_processors.items()}
    keys_before = set(unet.state_dict())
    out = nd.image.inject_nara(unet, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    assert out is unet
    for attn in attentions:
        for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            assert isinstance(layer, nd.core.NaRALinear)
    assert sum(isinstance(m, nd.core.NaRALinear) for m in unet.modules()) == 4 * len(attentions)
    assert {name: id(p) for name, p in unet.attn_processors.items()} == processors  # SDPA / custom untouched
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("nara_" in n for n in trainable)
    assert any(n.startswith("nara_hypernet.default.") for n in trainable)

    perturb_(unet, scale=0.05)
    adapted = generate(pipe)
    unet.set_attn_processor(AttnProcessor())  # a different (classic, non-SDPA) processor still calls the NaRA layers
    # another attention kernel: float32 rounding through 3 UNet calls (≈ 25 chained conv / norm / attention
    # reductions each, ≤ 9·64 = 576 terms) and the VAE decoder (≈ 10), pixels in [0, 1]: ≈ 1e-4. Skipping the NaRA
    # layers moves pixels by ≈ 1e-2.
    np.testing.assert_allclose(generate(pipe), adapted, rtol=0, atol=f32_tol(576, magnitude=1.0, depth=85))
    nd.remove_nara(unet)
    assert np.abs(generate(pipe) - adapted).max() > 1e-3
    assert not any(isinstance(m, nd.core.NaRALinear) for m in unet.modules())
    assert set(unet.state_dict()) == keys_before and not hasattr(unet, "nara_hypernet")


@pytest.mark.parametrize("make", [tiny_sdxl_pipeline, tiny_sd_pipeline], ids=["sdxl", "sd15"])
def test_pipeline_output_is_bit_identical_at_initialisation(make):
    pipe = make()
    base = generate(pipe)
    nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    assert (generate(pipe) == base).all()
    perturb_(pipe.unet)
    assert not (generate(pipe) == base).all()  # the adapter is in the path once it is not zero


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_every_denoising_step_sees_its_own_t_over_T(guidance_scale):
    pipe = tiny_sdxl_pipeline()
    nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    perturb_(pipe.unet)
    calls = _record_lambdas(pipe.unet)
    generate(pipe, num_inference_steps=4, num_images_per_prompt=2, guidance_scale=guidance_scale)
    assert len(calls) == 4
    expected_batch = 4 if guidance_scale > 1 else 2  # classifier-free guidance doubles the batch
    seen = []
    for call in calls:
        assert call["batch"] == expected_batch
        per_example = call["lam"].expand(call["batch"])  # a scalar timestep broadcasts to the batch
        # λ = t/T is one float32 division on each side (values ≤ 1); the next denoising step's t differs by ≥ 1/T
        torch.testing.assert_close(per_example, call["t"].expand(call["batch"]) / 1000, rtol=0, atol=f32_tol(1))
        seen.append(float(call["t"][0]))
    assert seen == pipe.scheduler.timesteps.tolist()


def test_one_lambda_per_example_when_timesteps_differ():
    pipe = tiny_sdxl_pipeline()
    unet = nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    perturb_(unet)
    unet.double()  # the perturbed adapter amplifies float32 rounding; in float64 batch and single calls agree
    calls = _record_lambdas(unet)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    hidden = torch.randn(3, 5, 64, generator=gen, dtype=torch.float64)
    added = {
        "text_embeds": torch.randn(3, 32, generator=gen, dtype=torch.float64),
        "time_ids": torch.full((3, 6), 64.0),
    }
    added["time_ids"] = added["time_ids"].double()
    timesteps = torch.tensor([10, 500, 990])
    with torch.no_grad():
        batched = unet(sample, timesteps, hidden, added_cond_kwargs=added).sample
        torch.testing.assert_close(calls[0]["lam"], torch.tensor([0.01, 0.5, 0.99]))
        for i in range(3):
            alone = unet(
                sample[i : i + 1],
                timesteps[i],
                hidden[i : i + 1],
                added_cond_kwargs={k: v[i : i + 1] for k, v in added.items()},
            ).sample
            # batch of 3 vs 1 (another GEMM blocking), float64: one UNet call, ≈ 25 chained reductions of ≤ 576
            # terms; the perturbed adapter branches reach ≈ 500 before the next GroupNorm: ≈ 5e-11. A λ swapped
            # between examples moves the output by ≈ 1.5.
            tol = f32_tol(576, magnitude=500.0, depth=25, dtype=torch.float64)
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=tol)
        swapped = unet(sample, timesteps.flip(0), hidden, added_cond_kwargs=added).sample
    assert not torch.allclose(swapped, batched)  # the output depends on each example's own timestep


def test_num_train_timesteps_comes_from_the_scheduler_and_out_of_range_timesteps_fail():
    pipe = tiny_sdxl_pipeline()
    pipe.scheduler.register_to_config(num_train_timesteps=500)
    unet = nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    assert unet.peft_config["default"].num_train_timesteps == 500
    assert unet.peft_config["default"].noise_input == "timestep"
    calls = _record_lambdas(unet)
    sample, hidden = torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 64)
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        unet(sample, 250, hidden, added_cond_kwargs=added)
        torch.testing.assert_close(calls[-1]["lam"], torch.tensor([0.5]))
        for bad in (501, -1, float("nan")):
            with pytest.raises(nd.NoiseLevelError, match=r"timestep must be finite and in \[0, 500\]"):
                unet(sample, torch.tensor([bad]), hidden, added_cond_kwargs=added)
    with pytest.raises(ValueError, match="disagrees with the scheduler"):
        nd.image.inject_nara(
            tiny_sdxl_pipeline().unet, nd.NaRAConfig(r=4), scheduler=pipe.scheduler, num_train_timesteps=9
        )


def test_a_custom_timestep_map_replaces_t_over_T():
    pipe = tiny_sdxl_pipeline()
    unet = nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=4), timestep_to_noise_level=lambda t: t.float() / 2000)
    assert unet.peft_config["default"].noise_input == "noise_level"  # λ given directly
    calls = _record_lambdas(unet)
    sample, hidden = torch.zeros(2, 4, 8, 8), torch.zeros(2, 5, 64)
    added = {"text_embeds": torch.zeros(2, 32), "time_ids": torch.zeros(2, 6)}
    with torch.no_grad():
        unet(sample, torch.tensor([100, 1800]), hidden, added_cond_kwargs=added)
        torch.testing.assert_close(calls[-1]["lam"], torch.tensor([0.05, 0.9]))
        with pytest.raises(nd.NoiseLevelError, match=r"in \[0, 1\]"):
            unet(sample, torch.tensor([100, 2400]), hidden, added_cond_kwargs=added)
    with pytest.raises(ValueError, match="read the timestep the same way"):
        nd.image.inject_nara(unet, nd.NaRAConfig(r=2), adapter_name="second")


def test_text_encoder_adapter_takes_the_timestep_per_example():
    pipe = tiny_sdxl_pipeline()
    encoder = nd.image.inject_nara(pipe.text_encoder_2, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    names = {n.rsplit(".", 1)[-1] for n, m in encoder.named_modules() if isinstance(m, nd.core.NaRALinear)}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj"}
    perturb_(encoder)
    ids = pipe.tokenizer_2(["a photo of sks toy"] * 2, padding="max_length", return_tensors="pt").input_ids
    with pytest.raises(nd.NoiseLevelError):
        encoder(ids)
    with torch.no_grad(), nd.noise_level(encoder, torch.tensor([100, 900])):
        both = encoder(ids).text_embeds
    # batch of 2 vs 1 is not bit-identical (another GEMM blocking): ≈ 45 chained reductions of ≤ 37 terms (2 CLIP
    # layers × 15: LayerNorm, q/k/v and its NaRA branch A → C → B, QKᵀ, softmax, attn·V, out, LayerNorm, fc1, fc2;
    # the final LayerNorm and projection; the hypernetwork, 64 + 256 + 512 ≈ 22 × 37), embeddings ≤ 2.5 after the
    # final LayerNorm: ≈ 5e-5 (seen: ≤ 3e-6 on AVX2, AVX-512 and the default kernels, 1 or 2 threads).
    tol = f32_tol(37, magnitude=2.5, depth=45)
    for i, t in enumerate((100, 900)):
        with torch.no_grad(), nd.noise_level(encoder, t):
            torch.testing.assert_close(encoder(ids[i : i + 1]).text_embeds, both[i : i + 1], rtol=0, atol=tol)
    # the same prompt at the two timesteps, i.e. what a λ given to the wrong example would produce: ≈ 3.4
    assert (both[0] - both[1]).abs().max() > 1000 * tol
