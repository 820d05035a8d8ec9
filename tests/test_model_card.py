"""Adapter folders people can publish: a model card with the base model as a Hub id, and no path of this machine."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import peft
import pytest
import torch
import yaml
from builders import perturb_, perturb_nara_, tiny_llama, tiny_sdxl_pipeline
from transformers import LlamaForCausalLM

import nara_diffusion as nd
from nara_diffusion.core import model_card as mc
from nara_diffusion.core.tuner import NARA_PEFT_MODEL_CLASSES, NaRAPeftModel

LLADA = "GSAI-ML/LLaDA-8B-Instruct"


def front_matter(folder: Path) -> tuple[dict, str]:
    """(the card's YAML front matter, parsed with yaml.safe_load; the body)."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), text[:80]
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert isinstance(meta, dict)
    return meta, body


def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def assert_no_machine_path(folder: Path, *paths: Path, files: tuple[str, ...] = ("README.md", "adapter_config.json")):
    for name in files:
        text = (folder / name).read_text(encoding="utf-8")
        for path in paths:
            assert str(path) not in text and str(path.resolve()) not in text, f"{name} names {path}"
        assert "/tmp" not in text and str(Path.home()) not in text, f"{name} names a local path:\n{text}"


def nara(base: torch.nn.Module, core: str = "noise") -> peft.PeftModel:
    model = nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"], core=core))
    perturb_(model)
    return model.eval()


def same_outputs(folder: Path, model: peft.PeftModel) -> None:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = model(ids, noise_level=0.4).logits
    for loaded in (nd.load_nara_model(tiny_llama(), folder), peft.PeftModel.from_pretrained(tiny_llama(), folder)):
        torch.testing.assert_close(loaded(ids, noise_level=0.4).logits, expected, rtol=0, atol=0)


# -- core: model.save_pretrained ----------------------------------------------------------------------------------
def test_a_base_loaded_from_a_local_folder_is_not_named_by_the_card(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    assert base.name_or_path == str(tmp_path / "base")  # what peft would have written as base_model
    model = nara(base)
    assert isinstance(model, peft.PeftModel)
    model.save_pretrained(tmp_path / "adapter")

    folder = tmp_path / "adapter"
    assert_no_machine_path(folder, tmp_path, files=("README.md",))
    # kept for local use (evaluation finds the base from it); the card never names it, push_to_hub clears it
    assert adapter_config(folder)["base_model_name_or_path"] == str(tmp_path / "base")
    assert adapter_config(folder)["weights_sha256"]  # the checksum still covers the weights (checked on load)
    meta, body = front_matter(folder)
    assert meta["library_name"] == "peft" and "base_model" not in meta
    assert {"nara", "peft", "diffusion"} <= set(meta["tags"])
    assert "records no Hub id" in body and "nd.load_nara_model(base," in body
    same_outputs(folder, model)


def test_a_relative_local_folder_shaped_like_a_hub_id_is_not_taken_for_one(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "acme" / "tiny")
    monkeypatch.chdir(tmp_path)
    model = nara(LlamaForCausalLM.from_pretrained("acme/tiny"))
    model.save_pretrained("adapter")
    assert adapter_config(tmp_path / "adapter")["base_model_name_or_path"] == "acme/tiny"  # as given, a local path
    assert "base_model" not in front_matter(tmp_path / "adapter")[0]


def test_the_hub_id_in_the_model_config_becomes_base_model(tmp_path):
    base = tiny_llama()
    base.config._name_or_path = LLADA
    model = nara(base)
    model.save_pretrained(tmp_path)
    meta, body = front_matter(tmp_path)
    assert meta["base_model"] == LLADA and meta["library_name"] == "peft"
    assert f"base_model:adapter:{LLADA}" in meta["tags"]
    assert adapter_config(tmp_path)["base_model_name_or_path"] == LLADA
    assert f'LlamaForCausalLM.from_pretrained("{LLADA}")' in body and "noise_level=" in body
    assert "| r | 2 |" in body and "| core_scale (η) | 0.1 |" in body and "`q_proj`, `v_proj`" in body
    same_outputs(tmp_path, model)


def test_a_local_folder_is_traced_to_the_hub_id_it_records_or_the_cache_it_sits_in(tmp_path):
    recorded = tmp_path / "recorded"
    tiny_llama().save_pretrained(recorded)
    config = json.loads((recorded / "config.json").read_text())
    (recorded / "config.json").write_text(json.dumps({**config, "_name_or_path": "acme/tiny-llama"}))
    nara(LlamaForCausalLM.from_pretrained(recorded)).save_pretrained(tmp_path / "a")
    assert front_matter(tmp_path / "a")[0]["base_model"] == "acme/tiny-llama"
    assert adapter_config(tmp_path / "a")["base_model_name_or_path"] == "acme/tiny-llama"

    snapshot = tmp_path / "hub" / "models--acme--tiny-llama-2" / "snapshots" / "0123abcd"
    tiny_llama().save_pretrained(snapshot)
    nara(LlamaForCausalLM.from_pretrained(snapshot)).save_pretrained(tmp_path / "b")
    assert front_matter(tmp_path / "b")[0]["base_model"] == "acme/tiny-llama-2"
    assert_no_machine_path(tmp_path / "b", tmp_path)


@pytest.mark.parametrize(("core", "method"), [("constant", "NaRA-C"), ("identity", "LoRA (identity core)")])
def test_the_card_names_the_method_and_takes_the_callers_base_model_and_training_facts(tmp_path, core, method):
    model = nara(tiny_llama(), core=core)
    extra = {
        "data": "alpaca (52k)",
        "steps": 1200,
        "scores": {"gsm8k": 0.41234, "humaneval": 0.2},
        "license": "mit",
        "tags": ["math"],
    }
    model.save_pretrained(tmp_path, base_model=LLADA, model_card=extra)
    meta, body = front_matter(tmp_path)
    assert meta["base_model"] == LLADA and meta["license"] == "mit"
    assert {"nara", "peft", "diffusion", "math"} <= set(meta["tags"])
    assert f"# {method} adapter for {LLADA}" in body and "noise_level=" not in body
    assert "- **data**: alpaca (52k)" in body and "- **steps**: 1200" in body and "  - **gsm8k**: 0.4123" in body
    assert "embedding" not in body  # no hypernetwork settings without a noise core
    assert adapter_config(tmp_path)["base_model_name_or_path"] == LLADA
    same_outputs(tmp_path, model)


def test_every_saved_adapter_config_gets_the_hub_id_and_other_processes_write_no_card(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = nara(LlamaForCausalLM.from_pretrained(tmp_path / "base"))
    model.add_adapter("other", nd.NaRAConfig(r=3, target_modules=["q_proj"], core="constant"))
    model.save_pretrained(tmp_path / "both", base_model=LLADA)
    assert adapter_config(tmp_path / "both" / "other")["base_model_name_or_path"] == LLADA
    assert_no_machine_path(tmp_path / "both", tmp_path)
    assert "`other/`" in front_matter(tmp_path / "both")[1]

    model.save_pretrained(tmp_path / "worker", is_main_process=False)
    assert not (tmp_path / "worker" / "README.md").exists()


def test_loaded_adapters_save_the_same_way_and_nara_peft_classes_pickle_by_name(tmp_path):
    base = tiny_llama()
    base.config._name_or_path = LLADA
    nara(base).save_pretrained(tmp_path / "a")
    loaded = nd.load_nara_model(tiny_llama(), tmp_path / "a")
    assert isinstance(loaded, NaRAPeftModel)
    loaded.save_pretrained(tmp_path / "b", save_embedding_layers=False)  # False: peft would look the base up online
    assert front_matter(tmp_path / "b")[0]["base_model"] == LLADA
    for cls in [NaRAPeftModel, *NARA_PEFT_MODEL_CLASSES.values()]:
        assert pickle.loads(pickle.dumps(cls)) is cls
    causal = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert isinstance(causal, peft.PeftModelForCausalLM) and type(causal).__name__ == "NaRAPeftModelForCausalLM"


def test_load_nara_model_takes_a_hub_repo_id(tmp_path, monkeypatch):
    model = nara(tiny_llama())
    model.save_pretrained(tmp_path)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = nd.load_nara_model(tiny_llama(), "acme/my-nara")
    assert calls == [("acme/my-nara", {"allow_patterns": ["adapter_config.json", "adapter_model.safetensors"]})]
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(loaded(ids, noise_level=0.2).logits, model(ids, noise_level=0.2).logits)


def test_hub_base_model_rules(tmp_path):
    assert mc.hub_base_model(None, "", "/abs/gone", "gpt2", LLADA) == LLADA
    assert mc.hub_base_model(str(tmp_path)) is None
    assert not mc.looks_like_hub_id("a--b/c") and not mc.looks_like_hub_id("../x") and not mc.looks_like_hub_id("x")
    with pytest.raises(ValueError, match="Hub id"):
        mc.write_model_card(tmp_path, nd.NaRAConfig(r=2), base_model=str(tmp_path))


# -- image: save_nara_weights -------------------------------------------------------------------------------------
def test_pipeline_adapter_folders_get_a_card_without_machine_paths(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    snapshot = tmp_path / "models--acme--tiny-sdxl" / "snapshots" / "abc"  # the Hub cache's layout
    tiny_sdxl_pipeline().save_pretrained(snapshot)
    pipe = nd.image.enable_nara_loading(StableDiffusionXLPipeline.from_pretrained(snapshot))
    nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=2), scheduler=pipe.scheduler)
    perturb_nara_(pipe.unet)
    folder = pipe.save_nara_weights(tmp_path / "adapter", model_card={"steps": 5})
    meta, body = front_matter(folder)
    assert meta["base_model"] == "acme/tiny-sdxl" and meta["library_name"] == "nara-diffusion"
    assert {"nara", "diffusers", "text-to-image"} <= set(meta["tags"])
    assert "pipe.load_nara_weights(" in body and "## Configuration (unet)" in body and "- **steps**: 5" in body
    assert str(tmp_path) not in (folder / "README.md").read_text()

    tiny_sdxl_pipeline().save_pretrained(tmp_path / "local")  # a local folder that records no Hub id
    local = nd.image.enable_nara_loading(StableDiffusionXLPipeline.from_pretrained(tmp_path / "local"))
    nd.image.inject_nara(local.unet, nd.NaRAConfig(r=2), scheduler=local.scheduler)
    folder = local.save_nara_weights(tmp_path / "from-local")
    assert "base_model" not in front_matter(folder)[0] and str(tmp_path) not in (folder / "README.md").read_text()

    plain = nd.image.enable_nara_loading(tiny_sdxl_pipeline())  # built from components: no name at all
    nd.image.inject_nara(plain.unet, nd.NaRAConfig(r=2), scheduler=plain.scheduler)
    folder = nd.image.save_nara_weights(tmp_path / "plain", unet=plain.unet)
    assert "base_model" not in front_matter(folder)[0]
    fresh = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    fresh.load_nara_weights(folder)
    assert fresh.get_nara_adapters() == {"unet": ["default"]}
