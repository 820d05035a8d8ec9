"""The one adapter-I/O layer: one atomic writer for every folder, file names defined once, old values still read."""

from __future__ import annotations

import json

import pytest
import torch
from builders import TinyNet, perturb_, perturb_nara_, reference_folder, tiny_sdxl_pipeline

import nara_diffusion as nd
from nara_diffusion.core import folders


class Killed(Exception):
    """A simulated kill at a point of a save."""


def _kill_at(monkeypatch, point: str) -> None:
    def kill_point(name, dst):
        if name == point:
            raise Killed(name)

    monkeypatch.setattr(folders, "_kill_point", kill_point)


def test_file_names_are_defined_once_and_say_which_folder_they_belong_to():
    names = {
        folders.ADAPTER_CONFIG_NAME: "adapter_config.json",
        folders.ADAPTER_WEIGHTS_NAME: "adapter_model.safetensors",
        folders.PIPELINE_CONFIG_NAME: "nara_config.json",
        folders.PIPELINE_WEIGHTS_NAME: "nara_weights.safetensors",
        folders.MODEL_CARD_NAME: "README.md",
        folders.REFERENCE_WEIGHTS_NAME: "adapter_model.bin",
    }
    assert all(k == v for k, v in names.items()) and len(set(names)) == 6
    from nara_diffusion.core import model_card, serialization
    from nara_diffusion.image import loaders

    for module in (serialization, loaders, model_card):  # the former per-module constants are gone
        assert not {"CONFIG_NAME", "WEIGHT_NAME", "WEIGHTS_NAME", "CARD_NAME"} & set(vars(module))


@pytest.mark.parametrize("point", ["tmp_written", "new_complete", "old_renamed", "new_renamed", "removing"])
def test_a_kill_while_converting_over_an_old_folder_loses_neither_copy(tmp_path, monkeypatch, point):
    reference_folder(tmp_path / "theirs")
    ours = tmp_path / "ours"
    nd.convert_reference_checkpoint(tmp_path / "theirs", ours)
    before = {p.name: p.read_bytes() for p in ours.iterdir()}
    (ours / "marker.txt").write_text("old copy")  # tells the old copy from the new one

    _kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        nd.convert_reference_checkpoint(tmp_path / "theirs", ours, overwrite=True)
    monkeypatch.setattr(folders, "_kill_point", lambda name, dst: None)
    folders.recover(ours)  # what the next save does first
    names = {p.name for p in ours.iterdir()}
    # the swap had not started (old copy intact) or its new copy was complete (new copy in place): never neither
    assert names in ({*before, "marker.txt"}, set(before))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    nd.load_nara_model(TinyNet(), ours)


def test_a_kill_while_saving_pipeline_weights_over_an_old_folder_loses_neither_copy(tmp_path, monkeypatch):
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=2), scheduler=pipe.scheduler)
    perturb_nara_(pipe.unet)
    pipe.save_nara_weights(tmp_path / "a")
    (tmp_path / "a" / "marker.txt").write_text("old copy")
    _kill_at(monkeypatch, "old_renamed")  # the old copy moved aside, the new one not yet in place
    with pytest.raises(Killed):
        pipe.save_nara_weights(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    folders.recover(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        folders.PIPELINE_CONFIG_NAME,
        folders.PIPELINE_WEIGHTS_NAME,
        folders.MODEL_CARD_NAME,
    }


def test_the_former_noise_input_value_is_read_from_old_adapter_folders(tmp_path):
    assert nd.NaRAConfig(noise_input="mask_ratio").noise_input == "noise_level"
    torch.manual_seed(0)
    model = nd.get_nara_model(TinyNet(), nd.NaRAConfig(r=3, target_modules=["layers.1"], init_weights=False))
    perturb_(model)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / folders.ADAPTER_CONFIG_NAME).read_text())
    assert raw["noise_input"] == "noise_level"
    raw["noise_input"] = "mask_ratio"  # as written before the value was renamed
    raw.pop("weights_sha256")  # the config alone changed; the weights are the same
    (tmp_path / folders.ADAPTER_CONFIG_NAME).write_text(json.dumps(raw))
    torch.manual_seed(0)
    loaded = nd.load_nara_model(TinyNet(), tmp_path)
    assert loaded.peft_config["default"].noise_input == "noise_level"
    x, lam = torch.randn(2, 12), torch.tensor([0.2, 0.9])
    model.eval()
    torch.testing.assert_close(loaded(x, noise_level=lam), model(x, noise_level=lam), rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise_input"):
        nd.NaRAConfig(noise_input="sigma")


def test_the_former_noise_input_value_is_read_from_old_pipeline_folders(tmp_path):
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    nd.image.inject_nara(pipe.unet, nd.NaRAConfig(r=2), timestep_to_noise_level=lambda t: t / 1000)
    assert pipe.unet.peft_config["default"].noise_input == "noise_level"
    pipe.save_nara_weights(tmp_path / "a")
    path = tmp_path / "a" / folders.PIPELINE_CONFIG_NAME
    raw = json.loads(path.read_text())
    raw["unet"]["noise_input"] = "mask_ratio"
    path.write_text(json.dumps(raw))
    fresh = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    with pytest.raises(nd.NaRALoadError, match="timestep_to_noise_level"):  # still read as "λ given directly"
        fresh.load_nara_weights(tmp_path / "a")
    fresh.load_nara_weights(tmp_path / "a", timestep_to_noise_level=lambda t: t / 1000)
    assert fresh.unet.peft_config["default"].noise_input == "noise_level"
