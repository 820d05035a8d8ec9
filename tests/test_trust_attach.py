"""A failed attach or load leaves the model exactly as it was (issue #13): module types, every hook dict,
``requires_grad``, training flags, attributes and outputs; targets NaRA cannot adapt are refused up front."""

from __future__ import annotations

import json
import warnings
from typing import Any

import peft
import pytest
import torch
from builders import generate, perturb_, perturb_nara_, tiny_llama, tiny_sdxl_pipeline
from reference import state_of
from safetensors.torch import load_file, save_file
from torch import nn

import nara_diffusion as nd
from nara_diffusion.core import serialization, tuner


def assert_same_state(model: nn.Module, before: dict[str, Any]) -> None:
    after = state_of(model)
    for key in ("types", "hooks", "requires_grad", "training", "attributes", "adapters"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())


class MixedNet(nn.Module):
    """Linear layers next to the layer kinds NaRA cannot adapt (in this order: emb, proj, conv1d, conv2d, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.conv1d = nn.Conv1d(8, 8, 1)
        self.conv2d = nn.Conv2d(8, 8, 1)
        self.out = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(ids)))  # [B, L, 8]
        h = self.conv1d(h.transpose(1, 2))  # [B, 8, L]
        h = self.conv2d(h.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        # contiguous: for a strided input, matmul's kernel depends on whether the weight requires grad, which an
        # attach changes (it freezes the base), and the last bit of the output with it
        return self.out(h.contiguous())


def _mixed() -> MixedNet:
    torch.manual_seed(0)
    return MixedNet().eval()


IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])

# (targets, what the error must say)
BAD_TARGETS = [
    (["nope"], r"not found in the base model"),
    (["emb"], r"emb \(Embedding\)"),
    (["conv2d"], r"conv2d \(Conv2d\)"),
    (["proj", "conv1d"], r"conv1d \(Conv1d\)"),
    (r".*conv.*", r"conv1d \(Conv1d\)(.|\n)*conv2d \(Conv2d\)"),
]


def _assert_keyword_not_swallowed(model: nn.Module) -> None:
    with pytest.raises(TypeError, match="noise_level"):  # no NaRA hook left to take the keyword off
        model(IDS, noise_level=0.5)


@pytest.mark.parametrize("targets,match", BAD_TARGETS, ids=["nothing", "embedding", "conv2d", "mixed", "regex"])
def test_a_failed_get_nara_model_changes_nothing_and_a_valid_one_works_afterwards(targets, match):
    base = _mixed()
    out, before = base(IDS), state_of(base)
    with pytest.raises(ValueError, match=match) as info:
        nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=targets))
    if targets != ["nope"]:
        assert "nn.Linear" in str(info.value) and "target_modules" in str(info.value)
        assert "proj (Linear)" not in str(info.value)  # only the offending modules are listed
    assert_same_state(base, before)
    assert torch.equal(base(IDS), out)
    _assert_keyword_not_swallowed(base)

    model = nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["proj", "out"]))
    assert torch.equal(model(IDS, noise_level=0.5), out)  # B starts at zero
    with pytest.raises(nd.NoiseLevelError):
        model(IDS)


@pytest.mark.parametrize("targets,match", BAD_TARGETS, ids=["nothing", "embedding", "conv2d", "mixed", "regex"])
def test_a_failed_first_inject_nara_changes_nothing(targets, match):
    base = _mixed()
    out, before = base(IDS), state_of(base)
    with pytest.raises(ValueError, match=match):
        nd.inject_nara(base, nd.NaRAConfig(r=2, target_modules=targets))
    assert_same_state(base, before)
    assert "_nara_tuner" not in vars(base) and not hasattr(base, "nara_hypernet") and not nd.is_nara_model(base)
    assert torch.equal(base(IDS), out)
    _assert_keyword_not_swallowed(base)
    nd.inject_nara(base, nd.NaRAConfig(r=2, target_modules=["proj"]))
    assert torch.equal(base(IDS, noise_level=0.3), out)


@pytest.mark.parametrize("targets,match", BAD_TARGETS, ids=["nothing", "embedding", "conv2d", "mixed", "regex"])
def test_a_failed_second_inject_nara_changes_nothing(targets, match):
    base = _mixed()
    raw = base(IDS)
    nd.inject_nara(base, nd.NaRAConfig(r=2, target_modules=["proj"], lora_dropout=0.0))
    perturb_(base)
    out, before = base(IDS, noise_level=0.3), state_of(base)
    with pytest.raises(ValueError, match=match):
        nd.inject_nara(base, nd.NaRAConfig(r=3, target_modules=targets), adapter_name="two")
    assert_same_state(base, before)
    assert list(base.nara_hypernet) == ["default"] and list(base._nara_tuner.peft_config) == ["default"]
    assert torch.equal(base(IDS, noise_level=0.3), out)
    nd.inject_nara(base, nd.NaRAConfig(r=3, target_modules=["proj", "out"]), adapter_name="two")
    assert torch.equal(base(IDS, noise_level=0.3), out)  # "default" stays active
    base._nara_tuner.set_adapter("two")
    assert torch.equal(base(IDS, noise_level=0.3), raw)  # B of "two" starts at zero


def test_a_failed_add_adapter_on_a_peft_model_changes_nothing():
    base = _mixed()
    model = nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["proj"], lora_dropout=0.0))
    perturb_(model)
    out, before = model(IDS, noise_level=0.4), state_of(model)
    with pytest.raises(ValueError, match=r"conv1d \(Conv1d\)"):
        model.add_adapter("two", nd.NaRAConfig(r=2, target_modules=["proj", "out", "conv1d"]))
    assert_same_state(model, before)
    assert list(model.peft_config) == ["default"] and list(model.base_model.nara_hypernet) == ["default"]
    assert torch.equal(model(IDS, noise_level=0.4), out)


# -- the belt and braces: a failure after the fit check (simulated) is rolled back too ----------------------
@pytest.fixture
def fail_on_second_layer(monkeypatch):
    calls = {"n": 0}
    original = tuner.NaRAModel._create_and_replace

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure in the middle of the injection")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tuner.NaRAModel, "_create_and_replace", flaky)
    return calls


def test_a_failure_in_the_middle_of_get_nara_model_is_rolled_back(fail_on_second_layer):
    base = _mixed()
    out, before = base(IDS), state_of(base)
    with pytest.raises(RuntimeError, match="simulated"):
        nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["proj", "out"]))
    assert_same_state(base, before)
    assert torch.equal(base(IDS), out)
    _assert_keyword_not_swallowed(base)


def test_a_failure_in_the_middle_of_inject_nara_is_rolled_back(fail_on_second_layer):
    base = _mixed()
    out, before = base(IDS), state_of(base)
    with pytest.raises(RuntimeError, match="simulated"):
        nd.inject_nara(base, nd.NaRAConfig(r=2, target_modules=["proj", "out"]))
    assert_same_state(base, before)
    assert torch.equal(base(IDS), out) and not nd.is_nara_model(base)

    fail_on_second_layer["n"] = -10  # the first adapter attaches
    nd.inject_nara(base, nd.NaRAConfig(r=2, target_modules=["proj"], lora_dropout=0.0))
    perturb_(base)
    out, before = base(IDS, noise_level=0.2), state_of(base)
    fail_on_second_layer["n"] = 0
    with pytest.raises(RuntimeError, match="simulated"):
        nd.inject_nara(base, nd.NaRAConfig(r=3, target_modules=["proj", "out"]), adapter_name="two")
    assert_same_state(base, before)
    assert torch.equal(base(IDS, noise_level=0.2), out)


# -- adapter folders ------------------------------------------------------------------------------------------
def _saved_llama(tmp_path, targets=("q_proj", "v_proj")):
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=list(targets)))
    perturb_(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _llama_state():
    base = tiny_llama()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    return base, ids, base(ids).logits, state_of(base)


def test_load_nara_model_refuses_a_folder_that_targets_an_embedding_before_touching_the_model(tmp_path):
    folder = _saved_llama(tmp_path)
    _edit_config(folder, target_modules=["q_proj", "v_proj", "embed_tokens"])
    base, ids, out, before = _llama_state()
    with pytest.raises(nd.NaRALoadError, match=r"embed_tokens \(Embedding\)") as info:
        nd.load_nara_model(base, folder)
    assert str(folder) in str(info.value)
    assert_same_state(base, before)
    assert torch.equal(base(ids).logits, out)
    _edit_config(folder, target_modules=["q_proj", "v_proj"])
    loaded = nd.load_nara_model(base, folder)
    assert not torch.equal(loaded(ids, noise_level=0.5).logits, out)


def test_peft_from_pretrained_refuses_the_same_folder_and_changes_nothing(tmp_path):
    folder = _saved_llama(tmp_path)
    _edit_config(folder, target_modules=["q_proj", "v_proj", "embed_tokens"])
    base, ids, out, before = _llama_state()
    with pytest.raises(ValueError, match=r"embed_tokens \(Embedding\)"):
        peft.PeftModel.from_pretrained(base, folder)
    assert_same_state(base, before)
    assert torch.equal(base(ids).logits, out)


def test_load_nara_model_with_a_weights_file_that_lacks_a_layer_changes_nothing(tmp_path):
    folder = _saved_llama(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    dropped = next(k for k in weights if k.endswith("v_proj.nara_B.weight"))
    del weights[dropped]
    save_file(weights, folder / "adapter_model.safetensors")
    _edit_config(folder, weights_sha256=None)  # as in a folder saved before the checksum existed
    base, ids, out, before = _llama_state()
    with pytest.raises(nd.NaRALoadError, match="missing from the file") as info:
        nd.load_nara_model(base, folder)
    assert dropped in str(info.value)
    assert_same_state(base, before)
    assert torch.equal(base(ids).logits, out)


def test_weights_changed_after_saving_are_refused_by_their_checksum(tmp_path):
    folder = _saved_llama(tmp_path)
    path = folder / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if k.endswith("nara_B.weight"))
    weights[key] = weights[key] + 1e-3  # a plausible, finite, well-shaped tensor: only the checksum tells
    save_file(weights, path, metadata={"format": "pt"})
    base, ids, out, before = _llama_state()
    with pytest.raises(nd.NaRALoadError, match="SHA-256") as info:
        nd.load_nara_model(base, folder)
    assert str(path) in str(info.value) and "weights_sha256" in str(info.value)
    assert_same_state(base, before)
    _edit_config(folder, weights_sha256=None)  # what the message offers for a deliberate change
    assert not torch.equal(nd.load_nara_model(base, folder)(ids, noise_level=0.5).logits, out)


def test_a_failure_while_setting_the_weights_is_rolled_back_completely(tmp_path, monkeypatch):
    folder = _saved_llama(tmp_path)
    base, ids, out, before = _llama_state()

    def boom(*args, **kwargs):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(serialization, "set_peft_model_state_dict", boom)
    with pytest.raises(RuntimeError, match="disk vanished"):
        nd.load_nara_model(base, folder)
    assert_same_state(base, before)  # also no input-embedding hook left by peft's PeftModel
    assert torch.equal(base(ids).logits, out)
    monkeypatch.undo()
    assert not torch.equal(nd.load_nara_model(base, folder)(ids, noise_level=0.5).logits, out)


# -- pipelines ------------------------------------------------------------------------------------------------
def _pipeline_state(pipe) -> dict[str, Any]:
    return {name: state_of(getattr(pipe, name)) for name in ("unet", "text_encoder", "text_encoder_2")}


def _assert_pipeline_unchanged(pipe, before, images) -> None:
    for name, state in before.items():
        assert_same_state(getattr(pipe, name), state)
    assert pipe.get_nara_adapters() == {}
    assert (generate(pipe) == images).all()


def _saved_pipeline_adapter(tmp_path, component: str, extra_target: str):
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    modules = {pipe.unet, getattr(pipe, component)}
    for module in modules:
        nd.image.inject_nara(module, nd.NaRAConfig(r=2), scheduler=pipe.scheduler)
    perturb_nara_(*modules)
    folder = pipe.save_nara_weights(tmp_path / "adapter")
    raw = json.loads((folder / "nara_config.json").read_text())
    raw[component]["target_modules"] = [*raw[component]["target_modules"], extra_target]
    (folder / "nara_config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    "component,extra,kind",
    [("unet", "conv_out", "Conv2d"), ("text_encoder", "token_embedding", "Embedding")],
    ids=["unet-conv_out", "text-encoder-token_embedding"],
)
def test_pipeline_load_with_a_config_that_targets_a_non_linear_module_changes_nothing(tmp_path, component, extra, kind):
    folder = _saved_pipeline_adapter(tmp_path, component, extra)
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    images, before = generate(pipe), _pipeline_state(pipe)
    with pytest.raises(nd.NaRALoadError, match=rf"{extra} \({kind}\)"):
        pipe.load_nara_weights(folder)
    _assert_pipeline_unchanged(pipe, before, images)
    pipe.unload_nara_weights()
    _assert_pipeline_unchanged(pipe, before, images)

    raw = json.loads((folder / "nara_config.json").read_text())
    raw[component]["target_modules"].remove(extra)
    (folder / "nara_config.json").write_text(json.dumps(raw))
    pipe.load_nara_weights(folder)
    assert pipe.get_nara_adapters() == {c: ["default"] for c in {"unet", component}}


def test_a_text_encoder_adapter_without_a_nara_unet_is_refused_before_anything_changes(tmp_path):
    trained = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    nd.image.inject_nara(trained.text_encoder, nd.NaRAConfig(r=2), scheduler=trained.scheduler)
    folder = trained.save_nara_weights(tmp_path / "adapter")
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    images, before = generate(pipe), _pipeline_state(pipe)
    with pytest.raises(nd.NaRALoadError, match="timestep of a NaRA UNet"):
        pipe.load_nara_weights(folder)
    _assert_pipeline_unchanged(pipe, before, images)


def test_a_failed_second_pipeline_adapter_is_rolled_back_exactly(tmp_path, monkeypatch):
    from nara_diffusion.image import loaders

    first = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    nd.image.inject_nara(first.unet, nd.NaRAConfig(r=2, target_modules=["to_q"]), scheduler=first.scheduler)
    perturb_nara_(first.unet)
    first.save_nara_weights(tmp_path / "a")
    second = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    nd.image.inject_nara(second.unet, nd.NaRAConfig(r=2, target_modules=["to_q", "to_k"]), scheduler=second.scheduler)
    nd.image.inject_nara(second.text_encoder, nd.NaRAConfig(r=2))
    perturb_nara_(second.unet, second.text_encoder)
    second.save_nara_weights(tmp_path / "b")

    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    pipe.load_nara_weights(tmp_path / "a")
    images, before = generate(pipe), _pipeline_state(pipe)
    original = loaders._load_tensors

    def fail_on_text_encoder(model, state, name):
        if model is pipe.text_encoder:
            raise RuntimeError("simulated failure while loading the text encoder")
        return original(model, state, name)

    monkeypatch.setattr(loaders, "_load_tensors", fail_on_text_encoder)
    with pytest.raises(RuntimeError, match="simulated"):
        pipe.load_nara_weights(tmp_path / "b")
    for name, state in before.items():
        assert_same_state(getattr(pipe, name), state)
    assert pipe.get_nara_adapters() == {"unet": ["default"]}
    assert (generate(pipe) == images).all()


def test_no_warning_noise_from_a_refused_attach():
    base = _mixed()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError):
        warnings.simplefilter("always")
        nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["emb"]))
    assert not [w for w in caught if "peft_config" in str(w.message)]


# -- item 3: the one load error, and what it refuses ----------------------------------------------------------------
def test_there_is_one_load_error_class():
    from nara_diffusion.image import loaders

    assert nd.NaRALoadError is nd.core.NaRALoadError is loaders.NaRALoadError is serialization.NaRALoadError
    assert serialization.AdapterLoadError is nd.NaRALoadError and issubclass(nd.NaRALoadError, ValueError)
    assert "NaRALoadError" in nd.__all__


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["nara_A", "hypernet"])
def test_non_finite_adapter_tensors_are_refused_naming_file_and_tensor(tmp_path, bad, which):
    folder = _saved_llama(tmp_path)
    path = folder / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if (which in k if which != "hypernet" else "nara_hypernet" in k))
    weights[key].view(-1)[0] = bad
    save_file(weights, path, metadata={"format": "pt"})
    _edit_config(folder, weights_sha256=None)  # the checksum would catch it first; the finiteness check stands alone
    base, ids, out, before = _llama_state()
    with pytest.raises(nd.NaRALoadError, match="NaN or infinite") as info:
        nd.load_nara_model(base, folder)
    assert str(path) in str(info.value) and key in str(info.value)
    assert_same_state(base, before)
    assert torch.equal(base(ids).logits, out)


@pytest.mark.parametrize(
    "text,names",
    [
        ("[1, 2, 3]", ["adapter_config.json", "list"]),
        ("null", ["adapter_config.json", "NoneType"]),
        ('"NARA"', ["adapter_config.json", "str"]),
        ("{not json", ["adapter_config.json", "not valid JSON"]),
        (b"\xff\xfe{}", ["adapter_config.json", "not valid JSON"]),
    ],
    ids=["list", "null", "string", "broken", "not-utf8"],
)
def test_malformed_config_files_raise_the_load_error_naming_the_file(tmp_path, text, names):
    folder = _saved_llama(tmp_path)
    path = folder / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    base, ids, out, before = _llama_state()
    with pytest.raises(nd.NaRALoadError) as info:
        nd.load_nara_model(base, folder)
    assert all(name in str(info.value) for name in names), str(info.value)
    assert_same_state(base, before)
    assert torch.equal(base(ids).logits, out)


@pytest.mark.parametrize(
    "field,value",
    [
        ("r", None),
        ("r", "2"),
        ("hidden_dims", 5),
        ("hidden_dims", None),
        ("core_scale", None),
        ("core_scale", "0.1"),
        ("lora_dropout", []),
        ("target_modules", 7),
        ("embedding", None),
        ("fourier_scale", None),
        ("num_train_timesteps", "1000"),
        ("init_weights", None),
        ("task_type", "NOT_A_TASK"),
    ],
)
def test_config_fields_of_the_wrong_type_raise_the_load_error_naming_file_and_field(tmp_path, field, value):
    folder = _saved_llama(tmp_path)
    _edit_config(folder, **{field: value})
    base, ids, out, before = _llama_state()
    with pytest.raises(nd.NaRALoadError) as info:
        nd.load_nara_model(base, folder)
    message = str(info.value)
    assert "adapter_config.json" in message and (field in message or field.replace("_", " ") in message), message
    assert_same_state(base, before)
    assert torch.equal(base(ids).logits, out)


def test_a_reference_format_config_without_r_ab_raises_the_load_error(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "adapter_config.json").write_text(json.dumps({"peft_type": "NARA", "c_scale": 0.1}))
    save_file({"x": torch.zeros(1)}, tmp_path / "ref" / "adapter_model.safetensors")
    with pytest.raises(nd.NaRALoadError, match=r"adapter_config\.json(.|\n)*r_ab"):
        nd.convert_reference_checkpoint(tmp_path / "ref", tmp_path / "out")
    with pytest.raises(nd.NaRALoadError, match="convert_reference_checkpoint"):
        nd.load_nara_model(tiny_llama(), tmp_path / "ref")
    (tmp_path / "ref" / "adapter_config.json").write_text(json.dumps({"peft_type": "NARA", "r_ab": "four"}))
    with pytest.raises(nd.NaRALoadError, match="r_ab"):
        nd.convert_reference_checkpoint(tmp_path / "ref", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_loading_onto_an_adapted_model_says_unload_first_or_use_load_adapter(tmp_path):
    folder = _saved_llama(tmp_path)
    ids = torch.randint(0, 64, (2, 5))
    loaded = nd.load_nara_model(tiny_llama(), folder)
    in_place = nd.inject_nara(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (loaded, loaded.base_model.model, in_place, lora, lora.base_model.model):
        before = state_of(model)
        with pytest.raises(nd.NaRALoadError, match=r"(?s)already carries.*[Uu]nload first.*load_adapter"):
            nd.load_nara_model(model, folder)
        assert_same_state(model, before)
    # the advice holds: load_adapter adds it as a second adapter
    loaded.load_adapter(str(folder), adapter_name="other")
    expected = loaded(ids, noise_level=0.3).logits
    loaded.set_adapter("other")
    assert torch.equal(loaded(ids, noise_level=0.3).logits, expected)


def test_modules_to_save_round_trip_through_load_nara_model(tmp_path):
    torch.manual_seed(0)
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    perturb_(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    model.save_pretrained(tmp_path)
    model.eval()
    ids = torch.randint(0, 64, (2, 5))
    loaded = nd.load_nara_model(tiny_llama(), tmp_path)
    assert torch.equal(loaded(ids, noise_level=0.4).logits, model(ids, noise_level=0.4).logits)


def test_pipeline_folders_with_non_finite_tensors_or_malformed_configs_raise_the_load_error(tmp_path):
    trained = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    nd.image.inject_nara(trained.unet, nd.NaRAConfig(r=2), scheduler=trained.scheduler)
    folder = trained.save_nara_weights(tmp_path / "adapter")
    weights_path, config_path = folder / "nara_weights.safetensors", folder / "nara_config.json"
    good_weights, good_config = weights_path.read_bytes(), config_path.read_text()
    pipe = nd.image.enable_nara_loading(tiny_sdxl_pipeline())
    before = _pipeline_state(pipe)

    weights = load_file(weights_path)
    key = next(k for k in weights if k.endswith("nara_B.weight"))
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, weights_path)
    with pytest.raises(nd.NaRALoadError, match="NaN or infinite") as info:
        pipe.load_nara_weights(folder)
    assert key in str(info.value) and str(weights_path) in str(info.value)
    weights_path.write_bytes(good_weights)

    for text, needle in [
        ("[]", "list"),
        ('{"format": "nara-diffusers", "version": 1, "unet": []}', "unet"),
        (json.dumps({**json.loads(good_config), "unet": {**json.loads(good_config)["unet"], "r": None}}), "r must"),
        (json.dumps({**json.loads(good_config), "unet": {**json.loads(good_config)["unet"], "hidden_dims": 3}}), "hid"),
    ]:
        config_path.write_text(text)
        with pytest.raises(nd.NaRALoadError, match=needle) as info:
            pipe.load_nara_weights(folder)
        assert "nara_config.json" in str(info.value)
    config_path.write_text(good_config)
    for name, state in before.items():
        assert_same_state(getattr(pipe, name), state)
    pipe.load_nara_weights(folder)
    assert pipe.get_nara_adapters() == {"unet": ["default"]}
