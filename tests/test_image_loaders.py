"""Pipelines: save_nara_weights → load_nara_weights into stock pipelines, scale, unload, errors that change nothing."""

from __future__ import annotations

import json

import pytest
import torch
from builders import generate, perturb_nara_, tiny_sd_pipeline, tiny_sdxl_pipeline
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

import nara_diffusion as nd
from nara_diffusion import NaRALoadError


def _adapted(text_encoders: bool = False, core: str = "noise", seed: int = 0):
    """A tiny SDXL pipeline with a random (non-zero) NaRA adapter on the UNet (and both text encoders)."""
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline(seed))
    cfg = nd.NaRAConfig(r=4, core=core)
    modules = [pipe.unet] + ([pipe.text_encoder, pipe.text_encoder_2] if text_encoders else [])
    for module in modules:
        nd.image.inject_nara(module, cfg, scheduler=pipe.scheduler)
    perturb_nara_(*modules)
    return pipe


def _nara_free(pipe) -> bool:
    return not any(isinstance(m, nd.core.NaRALinear) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())


@pytest.mark.parametrize("text_encoders", [False, True], ids=["unet", "unet+text-encoders"])
def test_save_then_load_into_a_fresh_stock_pipeline_reproduces_the_output(tmp_path, text_encoders):
    trained = _adapted(text_encoders)
    trained._sync_prompt_encoding()  # what load_nara_weights arranges: per-step prompts for NaRA text encoders
    expected = generate(trained)
    base = generate(tiny_sdxl_pipeline())
    assert not (expected == base).all()
    trained.save_nara_weights(tmp_path / "adapter")  # on an instance: every component that carries NaRA

    fresh = StableDiffusionXLPipeline(**tiny_sdxl_pipeline().components)  # a stock pipeline, loaded the usual way
    fresh.set_progress_bar_config(disable=True)
    assert nd.image.enable_nara_loading(fresh) is fresh
    assert type(fresh).__name__ == "StableDiffusionXLPipeline" and isinstance(fresh, StableDiffusionXLPipeline)
    fresh.load_nara_weights(tmp_path / "adapter")
    assert (generate(fresh) == expected).all()
    components = {"unet", "text_encoder", "text_encoder_2"} if text_encoders else {"unet"}
    assert fresh.get_nara_adapters() == {c: ["default"] for c in components}
    assert not any(p.requires_grad for c in components for n, p in getattr(fresh, c).named_parameters() if "nara_" in n)

    fresh.unload_nara_weights()
    assert (generate(fresh) == base).all() and _nara_free(fresh) and fresh.get_nara_adapters() == {}


def test_folder_layout_keys_and_config(tmp_path):
    pipe = _adapted(text_encoders=True)
    folder = nd.image.NaRAStableDiffusionXLPipeline.save_nara_weights(
        tmp_path / "adapter", unet=pipe.unet, text_encoder_2=pipe.text_encoder_2
    )
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "nara_config.json", "nara_weights.safetensors"]
    config = json.loads((folder / "nara_config.json").read_text())
    assert set(config) == {"format", "version", "unet", "text_encoder_2", "denoiser"}
    assert config["denoiser"] == {
        "component": "unet",
        "class": "UNet2DConditionModel",
        "family": "unet",
        "convention": "lambda = timestep / num_train_timesteps",
    }
    assert sorted(config["unet"]["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert config["unet"]["noise_input"] == "timestep" and config["unet"]["num_train_timesteps"] == 1000
    with safe_open(str(folder / "nara_weights.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert json.loads(handle.metadata()["nara_config"]) == config
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder_2"}
    assert not any(".default." in k or "base_layer" in k for k in keys)
    q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    assert {f"{q}.nara_A.weight", f"{q}.nara_B.weight", "unet.nara_hypernet.embedding.W"} <= keys
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj.nara_B.weight" in keys

    # the weights file alone is enough: the config is in its header
    (folder / "nara_config.json").unlink()
    lone = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    lone.load_nara_weights(folder / "nara_weights.safetensors")
    assert lone.get_nara_adapters() == {"unet": ["default"], "text_encoder_2": ["default"]}


def test_state_dict_with_configs_and_the_pipeline_class(tmp_path):
    pipe = _adapted()
    expected = generate(pipe)
    state = {f"unet.{k}": v for k, v in nd.image.nara_state_dict(pipe.unet).items()}
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "base")
    loaded = nd.image.NaRAStableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
    loaded.set_progress_bar_config(disable=True)
    with pytest.raises(NaRALoadError, match="carries no NaRA config"):
        loaded.load_nara_weights(state)
    loaded.load_nara_weights(state, configs={"unet": pipe.unet.peft_config["default"]}, adapter_name="toy")
    assert loaded.get_nara_adapters() == {"unet": ["toy"]}
    assert (generate(loaded) == expected).all()


def test_scale_is_absolute_and_zero_gives_the_base_output(tmp_path):
    pipe = _adapted(text_encoders=True)
    pipe.save_nara_weights(tmp_path / "adapter")
    fresh = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    base = generate(fresh)
    fresh.load_nara_weights(tmp_path / "adapter")
    full = generate(fresh)
    fresh.set_nara_scale(0.0)
    assert (generate(fresh) == base).all()
    fresh.set_nara_scale(0.5)
    half = generate(fresh)
    assert not (half == base).all() and not (half == full).all()
    fresh.set_nara_scale(0.5)  # not cumulative
    assert (generate(fresh) == half).all()
    fresh.set_nara_scale(1.0)
    assert (generate(fresh) == full).all()


def test_text_encoders_are_re_encoded_at_every_step_with_t_over_T(tmp_path):
    _adapted(text_encoders=True).save_nara_weights(tmp_path / "adapter")
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    pipe.load_nara_weights(tmp_path / "adapter")
    seen: dict[str, list[float]] = {"text_encoder": [], "text_encoder_2": []}
    for name in seen:
        hypernet = nd.get_adapter(getattr(pipe, name))
        hypernet.embedding.register_forward_hook(lambda m, i, o, name=name: seen[name].append(float(i[0])))
    received = []  # what the UNet is handed, after the per-step re-encoding (registered earlier) ran
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: received.append(
            (args[1], kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"])
        ),
        with_kwargs=True,
    )
    generate(pipe, num_inference_steps=4)
    steps = [t / 1000 for t in pipe.scheduler.timesteps.tolist()]
    for name, lams in seen.items():  # once before the loop (λ = 1, replaced), then once per step
        assert lams == pytest.approx([1.0, *steps], abs=1e-7), name
    assert len(received) == 4
    for t, hidden, added in received:  # exactly the pipeline's own encoding at this step's λ, [negative, positive]
        with torch.no_grad(), nd.noise_level(pipe.text_encoder, t), nd.noise_level(pipe.text_encoder_2, t):
            pos, neg, pooled, neg_pooled = type(pipe).encode_prompt(
                pipe, "a photo of sks toy", device=torch.device("cpu"), num_images_per_prompt=1
            )
        assert torch.equal(hidden, torch.cat([neg, pos])) and torch.equal(
            added["text_embeds"], torch.cat([neg_pooled, pooled])
        )
    assert not torch.equal(received[0][1], received[-1][1])
    with pytest.raises(ValueError, match=r"pass prompt=\.\.\., not prompt_embeds"):
        embeds = torch.zeros(1, 32, 64)
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 32), num_inference_steps=1)


def test_nara_c_text_encoders_need_no_per_step_encoding(tmp_path):
    _adapted(text_encoders=True, core="constant").save_nara_weights(tmp_path / "adapter")
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    pipe.load_nara_weights(tmp_path / "adapter")
    assert "encode_prompt" not in pipe.__dict__  # the stock encode_prompt runs
    assert not (generate(pipe) == generate(tiny_sdxl_pipeline())).all()


def test_weights_for_another_unet_leave_the_pipeline_unchanged(tmp_path):
    _adapted(text_encoders=True).save_nara_weights(tmp_path / "adapter")
    other = nd.image.enable_nara_loading(tiny_sd_pipeline())  # SD 1.5-shaped: other widths, one text encoder
    base = generate(other)
    hooks = len(other.unet._forward_pre_hooks)
    other.text_encoder_2 = None
    with pytest.raises(NaRALoadError, match="pipeline lacks"):
        other.load_nara_weights(tmp_path / "adapter")
    del other.text_encoder_2
    state, configs = nd.image.read_nara_weights(tmp_path / "adapter")
    unet_only = {k: v for k, v in state.items() if k.startswith("unet.")}
    with pytest.raises(NaRALoadError, match=r"do not fit the pipeline's unet(.|\n)*shape"):
        other.load_nara_weights(unet_only, configs={"unet": configs["unet"]})
    assert _nara_free(other) and other.get_nara_adapters() == {}
    assert len(other.unet._forward_pre_hooks) == hooks and (generate(other) == base).all()


def test_bad_folders_and_names(tmp_path):
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    with pytest.raises(FileNotFoundError, match="No NaRA weights"):
        pipe.load_nara_weights(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nara_weights\.safetensors"):
        pipe.load_nara_weights(tmp_path / "empty")
    folder = _adapted().save_nara_weights(tmp_path / "adapter")
    good = (folder / "nara_weights.safetensors").read_bytes()
    (folder / "nara_weights.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(NaRALoadError, match="truncated or corrupt"):
        pipe.load_nara_weights(folder)
    (folder / "nara_weights.safetensors").write_bytes(good)
    pipe.load_nara_weights(folder)
    with pytest.raises(NaRALoadError, match="already loaded"):
        pipe.load_nara_weights(folder, adapter_name="default")
    pipe.load_nara_weights(folder)  # a second adapter gets the next free name and becomes the active one
    assert pipe.get_nara_adapters() == {"unet": ["default", "default_1"]}
    assert pipe.unet._nara_tuner.active_adapters == ["default_1"]
    pipe.set_nara_adapter("default")
    assert pipe.unet._nara_tuner.active_adapters == ["default"]
    with pytest.raises(NaRALoadError, match="custom timestep"):
        custom = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
        nd.image.inject_nara(custom.unet, nd.NaRAConfig(r=2), timestep_to_noise_level=lambda t: t / 1000)
        custom.save_nara_weights(tmp_path / "custom")
        tiny = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
        tiny.load_nara_weights(tmp_path / "custom")


def test_sd15_pipelines_load_the_same_way(tmp_path):
    pipe = nd.image.enable_nara_loading(tiny_sd_pipeline())
    base = generate(pipe)
    for module in (pipe.unet, pipe.text_encoder):
        nd.image.inject_nara(module, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    perturb_nara_(pipe.unet, pipe.text_encoder)
    pipe._sync_prompt_encoding()
    expected = generate(pipe)
    pipe.save_nara_weights(tmp_path / "adapter")
    fresh = nd.image.enable_nara_loading(tiny_sd_pipeline())
    fresh.load_nara_weights(tmp_path / "adapter")
    assert fresh.get_nara_adapters() == {"unet": ["default"], "text_encoder": ["default"]}
    assert (generate(fresh) == expected).all() and not (expected == base).all()
    fresh.unload_nara_weights()
    assert (generate(fresh) == base).all()
