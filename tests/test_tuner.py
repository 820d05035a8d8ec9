"""NaRA as a peft method: targeting, training state, enable/disable, unload, and how λ reaches the layers."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from builders import TinyNet, perturb_, tiny_llama

import nara_diffusion as nd


def _adapted(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, nd.core.NaRALinear))


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
        (r".*layers\.1\.self_attn\.(k|o)_proj", {"k_proj", "o_proj"}),
        ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_target_modules_follow_peft_semantics(targets, expected):
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=targets))
    names = _adapted(model)
    assert {n.rsplit(".", 1)[-1] for n in names} == expected
    assert not any("lm_head" in n for n in names)  # all-linear leaves the output layer alone, as in peft
    if isinstance(targets, str) and targets != "all-linear":
        assert all(".layers.1." in n for n in names)


def test_llada_model_type_gets_its_default_targets():
    class LLaDALike(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = {"model_type": "llada"}  # what peft reads to pick default targets
            names = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
            self.block = torch.nn.ModuleDict({n: torch.nn.Linear(8, 8) for n in names})

        def forward(self, x):
            return sum(layer(x) for layer in self.block.values())

    model = nd.get_nara_model(LLaDALike(), nd.NaRAConfig(r=2))
    assert {n.rsplit(".", 1)[-1] for n in _adapted(model)} == {"q_proj", "k_proj", "v_proj", "attn_out"}


def test_print_trainable_parameters_counts_layers_and_the_hypernetwork_once(capsys):
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, _total = model.get_nb_trainable_parameters()
    lowrank = 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers × (q, v) × (A + B)
    hypernet = (64 * 256 + 256) + (256 * 512 + 512) + (512 * 16 + 16)
    assert trainable == lowrank + hypernet
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_modules_to_save_are_trained_and_saved(tmp_path):
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert any("lm_head.modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_disable_adapter_gives_the_base_model_and_needs_no_noise_level():
    base = tiny_llama()
    ids = torch.randint(0, 64, (2, 6))
    expected = base(ids).logits
    model = nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb_(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, expected)
    assert not torch.allclose(model(ids, noise_level=0.5).logits, expected, atol=1e-4)


def test_unload_returns_the_base_model_untouched():
    base = tiny_llama()
    state = copy.deepcopy(base.state_dict())
    ids = torch.randint(0, 64, (2, 6))
    expected = base(ids).logits
    model = nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb_(model)
    restored = model.unload()
    assert restored is base and not _adapted(restored)
    assert restored.state_dict().keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(restored(ids).logits, expected)  # also: no leftover hook wants a noise level


def test_merge_is_refused_and_changes_nothing():
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.base_model.model.model.layers[0].self_attn.q_proj.merge()
    assert _adapted(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_peft_get_peft_model_builds_the_same_thing():
    model = peft.get_peft_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(model.base_model, nd.core.NaRAModel)
    assert model(torch.randint(0, 64, (1, 4)), noise_level=0.3).logits.shape == (1, 4, 64)


def test_missing_noise_level_is_an_error_and_a_stale_one_is_never_reused():
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(nd.NoiseLevelError, match="without one"):
        model(ids)
    model(ids, noise_level=0.4)
    with pytest.raises(nd.NoiseLevelError, match="without one"):
        model(ids)
    # a layer called on its own, outside a model forward, has no noise level either
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(nd.NoiseLevelError, match="outside a forward"):
        q_proj(torch.randn(2, 5, 32))


@pytest.mark.parametrize(
    "bad,match",
    [
        (1.5, r"in \[0, 1\]"),
        (-0.1, r"in \[0, 1\]"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (torch.tensor([0.1, 0.2, 0.3]), "batch has 2"),
        (torch.rand(2, 1), "1-D"),
        ("half", "number or a tensor"),
    ],
)
def test_bad_noise_levels_are_rejected(bad, match):
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=match):
        model(torch.randint(0, 64, (2, 5)), noise_level=bad)
    model(torch.randint(0, 64, (2, 5)), noise_level=0.5)  # the model still works afterwards


def test_noise_level_context_manager_conditions_calls_without_the_keyword():
    model = nd.get_nara_model(TinyNet(), nd.NaRAConfig(r=3, target_modules=["layers.0"], lora_dropout=0.0))
    perturb_(model)
    x = torch.randn(2, 12)
    with nd.noise_level(model, torch.tensor([0.2, 0.7])):
        inside = model(x)
        with nd.noise_level(model, 0.9):
            torch.testing.assert_close(model(x), model(x, noise_level=0.9))
        torch.testing.assert_close(model(x), inside)
        torch.testing.assert_close(model(x, noise_level=0.9), model(x, noise_level=[0.9, 0.9]))  # keyword wins
    torch.testing.assert_close(inside, model(x, noise_level=torch.tensor([0.2, 0.7])))
    with pytest.raises(nd.NoiseLevelError):
        model(x)


def test_gradient_checkpointing_recomputes_with_the_same_core():
    ids = torch.randint(0, 64, (2, 6))
    lam = torch.tensor([0.3, 0.8])
    grads = []
    for checkpointing in (False, True):
        base = tiny_llama()
        model = nd.get_nara_model(base, nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        perturb_(model)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(ids, noise_level=lam).logits.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_every_adapted_layer_reads_the_one_shared_hypernetwork():
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    hn = nd.get_adapter(model)
    layers = [m for m in model.modules() if isinstance(m, nd.core.NaRALinear)]
    assert len(layers) == 4 and all(layer.noise_adapters["default"] is hn for layer in layers)
    # the hypernetwork is a submodule of the tuner only, so its parameters are counted once
    assert sum(1 for n, _ in model.named_parameters() if "generator.layers.0.weight" in n) == 1


def test_a_second_named_adapter_has_its_own_hypernetwork_and_switches():
    model = nd.get_nara_model(TinyNet(), nd.NaRAConfig(r=3, target_modules=["layers.0"], lora_dropout=0.0))
    perturb_(model)
    x = torch.randn(2, 12)
    first = model(x, noise_level=0.3)
    model.add_adapter("other", nd.NaRAConfig(r=2, target_modules=["layers.1"], core="constant", lora_dropout=0.0))
    assert list(model.base_model.nara_hypernet) == ["default", "other"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".other" in name:
                p.normal_()
    model.set_adapter("other")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in n for n in trainable)
    with model.disable_adapter():
        base_out = model(x)
    assert not torch.allclose(model(x), base_out, atol=1e-4)  # the constant core needs no noise level
    model.set_adapter("default")
    torch.testing.assert_close(model(x, noise_level=0.3), first)
    with pytest.raises(nd.NoiseLevelError):
        model(x)
    model.delete_adapter("other")
    assert list(model.base_model.nara_hypernet) == ["default"]
    with pytest.raises(ValueError, match="not found in the base model"):
        model.add_adapter("broken", nd.NaRAConfig(r=2, target_modules=["nothing_here"]))
    assert list(model.base_model.nara_hypernet) == ["default"]


def test_noise_levels_are_validated_even_for_cores_that_ignore_them():
    model = nd.get_nara_model(tiny_llama(), nd.NaRAConfig(r=2, target_modules=["q_proj"], core="identity"))
    ids = torch.randint(0, 64, (2, 5))
    model(ids)  # no noise level needed
    with pytest.raises(nd.NoiseLevelError, match="finite"):
        model(ids, noise_level=float("nan"))


def test_bf16_base_model_keeps_fp32_adapters_and_bf16_outputs():
    model = nd.get_nara_model(tiny_llama().to(torch.bfloat16), nd.NaRAConfig(r=4, target_modules=["q_proj"]))
    perturb_(model)
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_dtypes == {torch.float32}
    out = model(torch.randint(0, 64, (2, 5)), noise_level=torch.tensor([0.2, 0.9])).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert nd.get_adapter(model).generator.layers[0].weight.grad is not None


def test_scale_hooks_diffusers_calls_rescale_the_branch():
    model = nd.get_nara_model(TinyNet(), nd.NaRAConfig(r=3, target_modules=["layers.0"], lora_dropout=0.0)).eval()
    perturb_(model)
    x = torch.randn(2, 12)
    with model.disable_adapter():
        base = model(x)
    full = model(x, noise_level=0.3)
    layer = model.base_model.model.layers[0]
    layer.set_scale("default", 0.0)
    torch.testing.assert_close(model(x, noise_level=0.3), base)
    layer.set_scale("default", 1.0)
    layer.scale_layer(0.0)
    torch.testing.assert_close(model(x, noise_level=0.3), base)
    layer.unscale_layer()
    torch.testing.assert_close(model(x, noise_level=0.3), full)


def test_half_precision_cast_keeps_the_fourier_frequencies_in_float32():
    model = nd.get_nara_model(TinyNet(), nd.NaRAConfig(r=3, target_modules=["layers.0"]))
    W = nd.get_adapter(model).embedding.W.clone()
    model.to(torch.bfloat16)
    hn = nd.get_adapter(model)
    assert hn.embedding.W.dtype == torch.float32 and torch.equal(hn.embedding.W, W)
    assert hn.generator.layers[0].weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 12, dtype=torch.bfloat16), noise_level=0.5).dtype == torch.bfloat16
