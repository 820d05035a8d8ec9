"""DiffoRA: gates, search, discretisation, weight inheritance and reloading of the selected adapter."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from builders import tiny_llama

import nara_diffusion as nd
from nara_diffusion.selection import GatedAdapters, discretize, restrict_to, search, select_with_diffora
from nara_diffusion.selection.diffora import split_name

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 6), generator=gen) for _ in range(n)]


def _loss(model, ids, gen):
    lam = torch.rand(ids.shape[0], generator=gen)
    logits = model(ids, noise_level=lam).logits if hasattr(model.base_model, "nara_hypernet") else model(ids).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids.roll(1, dims=1).reshape(-1))


def _nara(seed=0):
    model = nd.get_nara_model(tiny_llama(seed=seed), nd.NaRAConfig(r=2, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():  # B starts at zero; give the branches something to gate
        for name, p in model.named_parameters():
            if "nara_B" in name:
                p.normal_(std=0.1)
    return model


def test_gates_scale_the_branch_and_receive_gradients():
    model = _nara()
    ids = _batches(1, 0)[0]
    full = model(ids, noise_level=0.5).logits
    gates = GatedAdapters(model, init=50.0)  # σ ≈ 1: the branch is unchanged
    torch.testing.assert_close(model(ids, noise_level=0.5).logits, full)
    with torch.no_grad():
        gates.alpha.fill_(-50.0)  # σ ≈ 0: the adapters are switched off
    with model.disable_adapter():
        base = model(ids).logits
    torch.testing.assert_close(model(ids, noise_level=0.5).logits, base, atol=1e-5, rtol=0)
    with torch.no_grad():
        gates.alpha.zero_()
    _loss(model, ids, torch.Generator().manual_seed(0)).backward()
    assert gates.alpha.grad is not None and (gates.alpha.grad != 0).all()
    gates.remove()
    torch.testing.assert_close(model(ids, noise_level=0.5).logits, full)


def test_discretize_global_and_per_layer():
    alphas = {
        f"layers.{i}.{m}": float(v) for i in range(3) for m, v in zip(("q", "k", "v"), torch.randn(3), strict=False)
    }
    for rate in (0.2, 0.5, 1.0):
        kept = discretize(alphas, rate)
        assert len(kept) == math.ceil(rate * 9)
        assert min(alphas[k] for k in kept) >= max([alphas[k] for k in alphas if k not in kept], default=-1e9)
    per_layer = discretize(alphas, 0.5, scope="per_layer")
    for i in range(3):
        layer = [k for k in per_layer if k.startswith(f"layers.{i}.")]
        assert len(layer) == 2
        assert min(alphas[k] for k in layer) >= max(
            alphas[f"layers.{i}.{m}"] for m in "qkv" if f"layers.{i}.{m}" not in layer
        )
    with pytest.raises(ValueError, match="sample_rate"):
        discretize(alphas, 0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        discretize(alphas, 1.5)
    assert split_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0") == (
        "down_blocks.1.attentions.0.transformer_blocks.0",
        "attn1.to_out.0",
    )


def test_search_then_restrict_inherits_the_searched_weights_and_reloads(tmp_path):
    model = _nara()
    kept = select_with_diffora(
        model, _batches(4, 1), _batches(2, 2), _loss, sample_rate=0.25, steps=4, adapter_lr=1e-2, output_dir=tmp_path
    )
    dam = json.loads((tmp_path / "diffora.json").read_text())
    assert dam["kept"] == kept and len(dam["alphas"]) == 8 and len(kept) == 2
    assert len(set(dam["alphas"].values())) > 1  # α moved away from its common initial value
    searched = {n: p.detach().clone() for n, p in model.named_parameters() if "nara_" in n}
    layers = {n for n, m in model.named_modules() if isinstance(m, nd.core.NaRALinear)}
    assert sorted(n.removeprefix("base_model.model.") for n in layers) == sorted(kept)
    # resuming reads the kept list back instead of searching
    again = _nara()
    assert select_with_diffora(again, [], [], _loss, output_dir=tmp_path, resume=True) == kept

    model.save_pretrained(tmp_path / "adapter")
    reloaded = nd.load_nara_model(tiny_llama(), tmp_path / "adapter")
    reloaded_params = dict(reloaded.named_parameters())
    for name, value in searched.items():  # kept layers and the hypernetwork, bit for bit
        assert torch.equal(reloaded_params[name], value), name
    ids = _batches(1, 3)[0]
    model.eval()
    torch.testing.assert_close(reloaded(ids, noise_level=0.4).logits, model(ids, noise_level=0.4).logits)


def test_lora_candidates_work_too():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=TARGETS))

    def loss(m, ids, gen):
        return m(ids).logits.pow(2).mean()

    alphas, _history = search(model, _batches(2, 0), _batches(2, 1), loss, steps=2, progress=False)
    restrict_to(model, discretize(alphas, 0.5))
    assert len([m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]) == 4
    assert model.peft_config["default"].target_modules == discretize(alphas, 0.5)


def test_search_without_held_out_data_is_an_error():
    with pytest.raises(ValueError, match="held-out"):
        search(_nara(), _batches(2, 0), [], _loss, steps=1, progress=False)
