"""`NaRAConfig`: defaults from the authors' configs, JSON round trip, and validation at the boundary."""

from __future__ import annotations

import json

import pytest

import nara_diffusion as nd


def test_defaults_follow_the_authors_released_configs():
    cfg = nd.NaRAConfig()
    assert (cfg.r, cfg.core_scale, cfg.lora_dropout, cfg.scaling) == (32, 0.1, 0.05, 1.0)
    assert (cfg.embedding, cfg.embedding_dim, cfg.fourier_scale, cfg.hidden_dims) == ("fourier", 64, 16.0, (256, 512))
    assert (cfg.core, cfg.noise_input, cfg.num_train_timesteps) == ("noise", "noise_level", 1000)
    assert cfg.peft_type == "NARA"


def test_scaling_has_no_alpha_over_r_unless_asked():
    assert nd.NaRAConfig(r=8).effective_scaling == 1.0
    assert nd.NaRAConfig(r=8, scaling=0.5, lora_alpha=16).effective_scaling == 0.5 * 16 / 8


def test_json_round_trip(tmp_path):
    cfg = nd.NaRAConfig(
        r=8,
        target_modules=["q_proj", "attn_out"],
        core="constant",
        hidden_dims=(32, 64, 16),
        embedding="mlp",
        noise_input="timestep",
        num_train_timesteps=500,
        modules_to_save=["head"],
        lora_alpha=4.0,
    )
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "NARA" and raw["hidden_dims"] == [32, 64, 16]
    loaded = nd.NaRAConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.hidden_dims == (32, 64, 16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "r must be"),
        ({"r": 2.5}, "r must be"),
        ({"core_scale": -0.1}, "core_scale"),
        ({"core": "hyper"}, "unknown core"),
        ({"embedding": "sinusoid"}, "unknown embedding"),
        ({"noise_input": "sigma"}, "unknown noise_input"),
        ({"embedding_dim": 63}, "even"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"hidden_dims": (0, 4)}, "hidden_dims"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"lora_alpha": 0}, "lora_alpha"),
    ],
)
def test_invalid_configs_raise_value_errors_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nd.NaRAConfig(**kwargs)


def test_target_modules_that_match_nothing_raise_and_leave_the_model_alone():
    from builders import TinyNet

    net = TinyNet()
    with pytest.raises(ValueError, match="not found in the base model"):
        nd.get_nara_model(net, nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    assert not any(isinstance(m, nd.core.NaRALinear) for m in net.modules())
    assert not hasattr(net, "peft_config")
