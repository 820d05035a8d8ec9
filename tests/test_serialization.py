"""Adapter folders: save → load round trips, failed loads that change nothing, and the authors' format."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from builders import TinyNet, perturb_, reference_folder, tiny_llama
from reference import reference_core, reference_lowrank
from safetensors.torch import load_file

import nara_diffusion as nd
from nara_diffusion.core import serialization

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _saved(tmp_path, **cfg_kwargs):
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=4, target_modules=TARGETS, **cfg_kwargs))
    perturb_(model)
    model.save_pretrained(tmp_path)
    return model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snapshot):
    assert not any(isinstance(m, nd.core.NaRALinear) for m in model.modules())
    assert not hasattr(model, "peft_config")
    state = model.state_dict()
    assert state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("core", ["noise", "constant"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, core):
    model = _saved(tmp_path, core=core)
    model.eval()
    ids, lam = torch.randint(0, 64, (3, 8)), torch.tensor([0.1, 0.6, 1.0])
    expected = model(ids, noise_level=lam).logits
    assert (tmp_path / "adapter_model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    if core == "noise":
        assert "base_model.nara_hypernet.embedding.W" in keys  # the Fourier buffer travels with the weights
    assert not any(".default" in k for k in keys)

    loaded = nd.load_nara_model(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(ids, noise_level=lam).logits, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    trainable = nd.load_nara_model(tiny_llama(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "nara_hypernet" in n or core != "noise")

    via_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(via_peft(ids, noise_level=lam).logits, expected, rtol=0, atol=0)


def test_load_under_another_adapter_name(tmp_path):
    model = _saved(tmp_path)
    model.eval()
    ids = torch.randint(0, 64, (2, 5))
    loaded = nd.load_nara_model(tiny_llama(), tmp_path, adapter_name="math")
    assert list(loaded.base_model.nara_hypernet) == ["math"]
    torch.testing.assert_close(loaded(ids, noise_level=0.3).logits, model(ids, noise_level=0.3).logits)


def test_missing_folder_config_or_weights(tmp_path):
    base = tiny_llama()
    with pytest.raises(FileNotFoundError, match="No adapter folder"):
        nd.load_nara_model(base, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        nd.load_nara_model(base, tmp_path)
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    snapshot = _snapshot(base)
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        nd.load_nara_model(base, tmp_path)
    _assert_untouched(base, snapshot)


def test_truncated_weights_are_reported_and_change_nothing(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    base = tiny_llama()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        nd.load_nara_model(base, tmp_path)
    _assert_untouched(base, snapshot)


def test_shapes_that_do_not_fit_the_base_model_change_nothing(tmp_path):
    _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match="does not fit this base model"):
        nd.load_nara_model(other, tmp_path)
    _assert_untouched(other, snapshot)


def test_a_failure_during_injection_is_rolled_back(tmp_path, monkeypatch):
    _saved(tmp_path)
    base = tiny_llama()
    snapshot = _snapshot(base)

    def boom(*args, **kwargs):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(serialization, "set_peft_model_state_dict", boom)
    with pytest.raises(RuntimeError, match="disk vanished"):
        nd.load_nara_model(base, tmp_path)
    _assert_untouched(base, snapshot)
    ids = torch.randint(0, 64, (1, 4))
    torch.testing.assert_close(base(ids).logits, tiny_llama()(ids).logits)  # no hook left asking for λ


def test_config_with_unknown_core_is_rejected(tmp_path):
    _saved(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw["core"] = "hyper"
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    base = tiny_llama()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match="unknown core"):
        nd.load_nara_model(base, tmp_path)
    _assert_untouched(base, snapshot)


# -- the authors' format ----------------------------------------------------------------------------------
def _reference_forward(base: TinyNet, state: dict[str, torch.Tensor], x, lam, r=3) -> torch.Tensor:
    hyper = {"W": state["base_model.embedding_layers.NL_emb.W"]}
    for j, i in enumerate((0, 2, 4)):
        hyper[f"w{j}"] = state[f"base_model.global_mapper.model.{i}.weight"]
        hyper[f"b{j}"] = state[f"base_model.global_mapper.model.{i}.bias"]
    C = reference_core(hyper, lam, r, 0.1)
    h = x
    for idx, layer in enumerate(base.layers):
        out = layer(h)
        if f"base_model.model.layers.{idx}.lora_A" in state:
            A, B = state[f"base_model.model.layers.{idx}.lora_A"], state[f"base_model.model.layers.{idx}.lora_B"]
            out = out + reference_lowrank(h, A, B, C, 1.0)
        h = torch.tanh(out)
    return base.head(h)


def test_reference_checkpoint_converts_and_computes_the_authors_outputs(tmp_path):
    state = reference_folder(tmp_path / "theirs")
    with pytest.raises(ValueError, match="convert_reference_checkpoint"):
        nd.load_nara_model(TinyNet(), tmp_path / "theirs")

    out = nd.convert_reference_checkpoint(tmp_path / "theirs", tmp_path / "ours")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["core_scale"], cfg["scaling"], cfg["hidden_dims"]) == (3, 0.1, 1.0, [16, 24])

    torch.manual_seed(0)
    base = TinyNet().eval()
    reference = copy.deepcopy(base)
    model = nd.load_nara_model(base, out)
    x, lam = torch.randn(3, 4, 12), torch.tensor([0.0, 0.45, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, noise_level=lam), _reference_forward(reference, state, x, lam))

    with pytest.raises(FileExistsError, match="overwrite=True"):
        nd.convert_reference_checkpoint(tmp_path / "theirs", tmp_path / "ours")
    nd.convert_reference_checkpoint(tmp_path / "theirs", tmp_path / "ours", overwrite=True)


def test_reference_constant_core_converts(tmp_path):
    path = tmp_path / "theirs"
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "NARA", "r_ab": 2, "c_scale": 0.1, "input_mode": "constant", "target_modules": ["layers.1"]}
        )
    )
    torch.save(
        {
            "base_model.constant_c": torch.ones(2, 2),
            "base_model.model.layers.1.lora_A": torch.ones(2, 12),
            "base_model.model.layers.1.lora_B": torch.ones(12, 2),
        },
        path / "adapter_model.bin",
    )
    nd.convert_reference_checkpoint(path, tmp_path / "ours")
    model = nd.load_nara_model(TinyNet(), tmp_path / "ours")
    torch.testing.assert_close(nd.get_adapter(model).core()[0], torch.eye(2) + 0.1)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"input_mode": "both"}, "noise density"),
        ({"mapper_groups": {"qk": ["q_proj"]}}, "mapper_groups"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_unsupported_reference_features_are_named(tmp_path, change, match):
    reference_folder(tmp_path / "theirs")
    raw = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    raw.update(change)
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        nd.convert_reference_checkpoint(tmp_path / "theirs", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
