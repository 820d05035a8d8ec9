"""NaRA on diffusion transformers (SD3, Flux): targets, λ = σ per example, stock-pipeline loading, the architecture
check, living beside a diffusers LoRA, and the import hook that gives every pipeline the loader methods."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from builders import generate, perturb_, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from reference import f32_tol
from torch import nn

import nara_diffusion as nd
from nara_diffusion import NaRALoadError

FAMILIES = {"sd3": (tiny_sd3_pipeline, StableDiffusion3Pipeline), "flux": (tiny_flux_pipeline, FluxPipeline)}
JOINT = {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}  # "0": to_out.0


def _stock(family: str, seed: int = 0):
    """A stock pipeline (the diffusers class itself, never converted) built from the tiny one's components."""
    make, cls = FAMILIES[family]
    pipe = cls(**make(seed).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapted(family: str):
    pipe = _stock(family)
    nd.image.inject_nara(pipe.transformer, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    perturb_(pipe.transformer)
    return pipe


def _nara_free(pipe) -> bool:
    return not any(isinstance(m, nd.core.NaRALinear) for m in pipe.transformer.modules())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_default_targets_include_the_joint_attention_and_init_is_bit_identical(family):
    pipe = _stock(family)
    base = generate(pipe)
    linears = [n for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)]
    attention = {n for n in linears if n.rsplit(".", 1)[-1] in JOINT - {"0"} or n.endswith(".to_out.0")}
    nd.image.inject_nara(pipe.transformer, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
    layers = {n for n, m in pipe.transformer.named_modules() if isinstance(m, nd.core.NaRALinear)}
    assert {n.rsplit(".", 1)[-1] for n in layers} == JOINT
    assert layers == attention  # every attention projection, nothing else (not the MLPs, norms, embedders)
    assert (generate(pipe) == base).all()
    perturb_(pipe.transformer)
    assert not (generate(pipe) == base).all()


def _record(transformer) -> list[dict]:
    """Per transformer call: its timestep and batch (read before the NaRA hook) and the λ the hypernetwork got."""
    calls: list[dict] = []

    def before(module, args, kwargs):
        calls.append({"t": kwargs["timestep"].clone(), "batch": kwargs["hidden_states"].shape[0]})

    transformer.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
    hypernet = nd.get_adapter(transformer)
    hypernet.embedding.register_forward_hook(lambda m, i, o: calls[-1].__setitem__("lam", i[0].clone()))
    return calls


@pytest.mark.parametrize(
    ("family", "guidance_scale", "batch"),
    [("sd3", 5.0, 4), ("sd3", 1.0, 2), ("flux", 3.5, 2)],
    ids=["sd3-cfg", "sd3-no-cfg", "flux-guidance-embedding"],
)
def test_every_step_sees_the_schedulers_sigma_per_example(family, guidance_scale, batch):
    pipe = _adapted(family)
    calls = _record(pipe.transformer)
    generate(pipe, num_inference_steps=4, num_images_per_prompt=2, guidance_scale=guidance_scale)
    sigmas = pipe.scheduler.sigmas[:-1]  # the σ of each step (the last entry is the final 0)
    assert len(calls) == 4 and len(set(sigmas.tolist())) == 4
    for call, sigma in zip(calls, sigmas, strict=True):
        assert call["batch"] == batch  # SD3 doubles the batch under CFG; Flux embeds the guidance instead
        # SD3: the pipeline passes σ·1000 and λ = t/1000; Flux: σ·1000 cast, then / 1000 in the pipeline, λ = t:
        # two float32 roundings of values ≤ 1 on either path. Neighbouring steps differ by ≥ 0.05.
        lam = call["lam"].expand(batch)
        torch.testing.assert_close(lam, sigma.expand(batch), rtol=0, atol=f32_tol(2))
    config = pipe.transformer.peft_config["default"]
    assert config.noise_input == ("timestep" if family == "sd3" else "noise_level")


def test_one_lambda_per_example_in_one_flux_call():
    pipe = _adapted("flux")
    calls = _record(pipe.transformer)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, 16, generator=gen)
    inputs = dict(
        hidden_states=hidden,
        encoder_hidden_states=torch.randn(3, 5, 32, generator=gen),
        pooled_projections=torch.randn(3, 32, generator=gen),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.full((3,), 3.5),
    )
    sigmas = torch.tensor([0.1, 0.5, 0.95])
    with torch.no_grad():
        out = pipe.transformer(timestep=sigmas, **inputs).sample
        torch.testing.assert_close(calls[-1]["lam"], sigmas, rtol=0, atol=0)
        swapped = pipe.transformer(timestep=sigmas.flip(0), **inputs).sample
    assert not torch.allclose(out, swapped)  # each example is conditioned on its own σ


def test_an_unknown_denoiser_needs_an_explicit_map():
    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.to_q(x)

    model = Denoiser()
    with pytest.raises(ValueError, match="timestep_to_noise_level") as info:
        nd.image.inject_nara(model, nd.NaRAConfig(r=2))
    assert "FluxTransformer2DModel" in str(info.value) and not hasattr(model, "nara_hypernet")
    nd.image.inject_nara(model, nd.NaRAConfig(r=2), timestep_to_noise_level=lambda t: t / 10)
    calls = []
    nd.get_adapter(model).embedding.register_forward_hook(lambda m, i, o: calls.append(i[0]))
    model(torch.zeros(2, 4), torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(calls[0], torch.tensor([0.1, 0.5]))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_save_then_load_into_a_fresh_stock_pipeline_then_unload(tmp_path, family):
    trained = _adapted(family)
    expected = generate(trained)
    base = generate(_stock(family))
    assert not (expected == base).all()
    trained.save_nara_weights(tmp_path / "adapter")  # a stock pipeline: no enable call before
    record = json.loads((tmp_path / "adapter" / "nara_config.json").read_text())["denoiser"]
    transformer_cls = type(trained.transformer).__name__
    assert record["component"] == "transformer" and record["family"] == family and record["class"] == transformer_cls

    fresh = _stock(family)
    fresh.load_nara_weights(tmp_path / "adapter")
    assert type(fresh).__name__ == FAMILIES[family][1].__name__ and isinstance(fresh, FAMILIES[family][1])
    assert fresh.get_nara_adapters() == {"transformer": ["default"]}
    assert (generate(fresh) == expected).all()
    fresh.unload_nara_weights()
    assert (generate(fresh) == base).all() and _nara_free(fresh) and fresh.get_nara_adapters() == {}


@pytest.mark.parametrize(
    ("source", "target"),
    [("flux", "sd3"), ("sd3", "flux"), ("sdxl", "flux")],
    ids=["flux-into-sd3", "sd3-into-flux", "sdxl-into-flux"],
)
def test_a_folder_for_another_architecture_is_refused_and_nothing_changes(tmp_path, source, target):
    if source == "sdxl":
        trained = tiny_sdxl_pipeline()
        nd.image.inject_nara(trained.unet, nd.NaRAConfig(r=4), scheduler=trained.scheduler)
    else:
        trained = _adapted(source)
    trained.save_nara_weights(tmp_path / "adapter")
    pipe = _stock(target)
    base, hooks = generate(pipe), len(pipe.transformer._forward_pre_hooks)
    keys = set(pipe.transformer.state_dict())
    with pytest.raises(NaRALoadError, match=r"trained for a .*Nothing was changed"):
        pipe.load_nara_weights(tmp_path / "adapter")
    assert _nara_free(pipe) and pipe.get_nara_adapters() == {} and set(pipe.transformer.state_dict()) == keys
    assert len(pipe.transformer._forward_pre_hooks) == hooks and (generate(pipe) == base).all()


def test_noise_conditioned_text_encoders_are_refused_for_flux(tmp_path):
    trained = _adapted("flux")
    nd.image.inject_nara(trained.text_encoder, nd.NaRAConfig(r=2), timestep_to_noise_level=lambda s: s)
    trained.save_nara_weights(tmp_path / "adapter")
    pipe = _stock("flux")
    with pytest.raises(NaRALoadError, match="NaRA-C"):
        pipe.load_nara_weights(tmp_path / "adapter")
    assert _nara_free(pipe) and pipe.get_nara_adapters() == {}


def _lora_folder(path):
    source = tiny_sd3_pipeline()
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    source.transformer.add_adapter(config)
    StableDiffusion3Pipeline.save_lora_weights(
        path, transformer_lora_layers=get_peft_model_state_dict(source.transformer)
    )
    return path


@pytest.mark.parametrize("order", ["nara-first", "lora-first"])
def test_nara_and_a_diffusers_lora_both_act_and_unload_separately(tmp_path, order):
    lora = _lora_folder(tmp_path / "lora")
    _adapted("sd3").save_nara_weights(tmp_path / "nara")
    base = generate(_stock("sd3"))
    nara_only = _stock("sd3")
    nara_only.load_nara_weights(tmp_path / "nara")
    nara_only = generate(nara_only)
    lora_only = _stock("sd3")
    lora_only.load_lora_weights(lora, adapter_name="lo")
    lora_only = generate(lora_only)

    pipe = _stock("sd3")
    if order == "nara-first":  # attached in place, never converted: diffusers' unload goes through the import hook
        nd.image.inject_nara(pipe.transformer, nd.NaRAConfig(r=4), scheduler=pipe.scheduler)
        pipe.transformer.load_state_dict(_stock_state(tmp_path / "nara"), strict=False)
        pipe.load_lora_weights(lora, adapter_name="lo")
    else:
        pipe.load_lora_weights(lora, adapter_name="lo")
        pipe.load_nara_weights(tmp_path / "nara")
    both = generate(pipe)
    assert not (both == nara_only).all() and not (both == lora_only).all() and not (both == base).all()
    assert "lo" in pipe.get_list_adapters()["transformer"]
    assert pipe.get_nara_adapters() == {"transformer": ["default"]}
    if order == "nara-first":
        pipe.unload_lora_weights()
        assert (generate(pipe) == nara_only).all()  # NaRA stays, exactly
        assert pipe.get_nara_adapters() == {"transformer": ["default"]} and list(pipe.transformer.peft_config) == [
            "default"
        ]
        pipe.unload_nara_weights()
    else:
        pipe.unload_nara_weights()
        assert (generate(pipe) == lora_only).all()  # the LoRA stays, exactly
        assert pipe.get_list_adapters() == {"transformer": ["lo"]} and pipe.get_nara_adapters() == {}
        pipe.unload_lora_weights()
    assert (generate(pipe) == base).all() and _nara_free(pipe)


def _stock_state(folder):
    """The transformer's NaRA tensors of a saved folder, keyed as the attached adapter "default" holds them."""
    state, _ = nd.image.read_nara_weights(folder)
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        if key.startswith("nara_hypernet."):
            out[key.replace("nara_hypernet.", "nara_hypernet.default.", 1)] = tensor
        else:
            stem, _, leaf = key.rpartition(".")
            out[f"{stem}.default.{leaf}"] = tensor
    return out


@pytest.mark.slow
@pytest.mark.parametrize("first", ["nara_diffusion", "diffusers"])
def test_every_pipeline_has_the_loader_methods_whichever_is_imported_first(first):
    code = f"""
import json, sys
import {first}
light = "diffusers" not in sys.modules if {first == "nara_diffusion"} else None
import nara_diffusion, diffusers
from diffusers import DiffusionPipeline
from diffusers.loaders.peft import PeftAdapterMixin
names = ["load_nara_weights", "save_nara_weights", "unload_nara_weights", "set_nara_scale", "get_nara_adapters"]
has = all(callable(getattr(DiffusionPipeline, name)) for name in names)
keeps = getattr(PeftAdapterMixin.unload_lora, "_nara_keeps_nara", False)
print(json.dumps({{"light": light, "has": has, "keeps": keeps}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["has"] and result["keeps"]  # every pipeline class inherits them from DiffusionPipeline
    assert result["light"] is (True if first == "nara_diffusion" else None)  # nara_diffusion alone: no diffusers


def test_a_failed_nara_load_beside_a_lora_leaves_the_lora_exactly(tmp_path, monkeypatch):
    from nara_diffusion.image import loaders

    lora = _lora_folder(tmp_path / "lora")
    _adapted("sd3").save_nara_weights(tmp_path / "nara")
    pipe = _stock("sd3")
    pipe.load_lora_weights(lora, adapter_name="lo")
    before, modules = generate(pipe), dict(pipe.transformer.named_modules())

    def fail(model, state, name):
        raise RuntimeError("simulated failure after the attach")

    monkeypatch.setattr(loaders, "_load_tensors", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        pipe.load_nara_weights(tmp_path / "nara")
    assert dict(pipe.transformer.named_modules()) == modules and _nara_free(pipe)
    assert pipe.get_nara_adapters() == {} and pipe.get_list_adapters() == {"transformer": ["lo"]}
    assert (generate(pipe) == before).all()


def test_sd3_text_encoders_are_re_encoded_at_every_step_with_sigma(tmp_path):
    trained = _adapted("sd3")
    for name in ("text_encoder", "text_encoder_3"):  # a CLIP encoder and the T5 encoder
        nd.image.inject_nara(getattr(trained, name), nd.NaRAConfig(r=2), scheduler=trained.scheduler)
        perturb_(getattr(trained, name), seed=5)
    trained.save_nara_weights(tmp_path / "adapter")
    pipe = _stock("sd3")
    pipe.load_nara_weights(tmp_path / "adapter")
    assert pipe.get_nara_adapters() == {c: ["default"] for c in ("transformer", "text_encoder", "text_encoder_3")}
    seen: list[float] = []
    nd.get_adapter(pipe.text_encoder_3).embedding.register_forward_hook(lambda m, i, o: seen.append(float(i[0])))
    received = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: received.append((k["timestep"][0], k["encoder_hidden_states"], k["pooled_projections"])),
        with_kwargs=True,
    )
    generate(pipe, num_inference_steps=3)
    sigmas = pipe.scheduler.sigmas[:-1].tolist()
    # before the loop (λ = 1, replaced), then once per step; SD3 encodes the prompt and the negative prompt apart
    assert seen == pytest.approx([lam for lam in [1.0, *sigmas] for _ in (0, 1)], abs=f32_tol(2))
    for t, hidden, pooled in received:  # exactly the pipeline's own encoding at this step's λ, [negative, positive]
        with torch.no_grad(), nd.noise_level(pipe.text_encoder, t), nd.noise_level(pipe.text_encoder_3, t):
            pos, neg, pos_pooled, neg_pooled = type(pipe).encode_prompt(
                pipe, "a photo of sks toy", None, None, device=torch.device("cpu")
            )
        assert torch.equal(hidden, torch.cat([neg, pos])) and torch.equal(pooled, torch.cat([neg_pooled, pos_pooled]))
    assert not torch.equal(received[0][1], received[-1][1])


def test_when_imported_runs_after_the_module_executes_and_keeps_its_loader(tmp_path, monkeypatch):
    from nara_diffusion._compat import when_imported

    (tmp_path / "nara_probe_module.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("nara_probe_module", lambda module: seen.append(module.VALUE + 1))
    assert seen == []  # nothing imported yet
    import nara_probe_module

    assert seen == [42]
    assert type(nara_probe_module.__loader__).__name__ == "SourceFileLoader"  # the real loader, put back
    when_imported("nara_probe_module", lambda module: seen.append(0))  # already imported: at once
    assert seen == [42, 0]
    monkeypatch.delitem(sys.modules, "nara_probe_module")
