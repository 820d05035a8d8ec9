"""The layer formula h = W0·x + s·B·C(λ)ᵀ·A·dropout(x), against computations written out in the tests."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from builders import TinyNet, perturb_, tiny_llama
from reference import f32_tol, reference_core, reference_lowrank

import nara_diffusion as nd


def _hyper_tensors(model) -> dict[str, torch.Tensor]:
    hn = nd.get_adapter(model)
    linears = [m for m in hn.generator.layers if isinstance(m, torch.nn.Linear)]
    out = {"W": hn.embedding.W.detach()}
    for i, lin in enumerate(linears):
        out[f"w{i}"], out[f"b{i}"] = lin.weight.detach(), lin.bias.detach()
    return out


def _expected_tinynet(base: TinyNet, model, x: torch.Tensor, lam: torch.Tensor, cfg: nd.NaRAConfig) -> torch.Tensor:
    C = reference_core(_hyper_tensors(model), lam, cfg.r, cfg.core_scale)
    wrapped = model.base_model.model
    h = x
    for base_layer, nara_layer in zip(base.layers, wrapped.layers, strict=False):
        A = nara_layer.nara_A["default"].weight.detach()
        B = nara_layer.nara_B["default"].weight.detach()
        h = torch.tanh(base_layer(h) + reference_lowrank(h, A, B, C, cfg.effective_scaling))
    return base.head(h)


def test_output_equals_base_model_at_initialisation(tiny_net):
    x = torch.randn(4, 6, 12)
    expected = tiny_net(x)
    model = nd.get_nara_model(tiny_net, nd.NaRAConfig(r=4, target_modules=["layers.0", "layers.1", "layers.2"]))
    torch.testing.assert_close(model(x, noise_level=torch.rand(4)), expected, rtol=0, atol=0)
    # and C(λ) is exactly I at initialisation, for any λ
    torch.testing.assert_close(nd.get_adapter(model).core(torch.rand(3)), torch.eye(4).expand(3, 4, 4))


@pytest.mark.parametrize("lora_alpha", [None, 8.0])
def test_perturbed_adapter_matches_formula_with_one_lambda_per_example(lora_alpha):
    torch.manual_seed(0)
    base = TinyNet().eval()
    reference = copy.deepcopy(base)
    cfg = nd.NaRAConfig(r=4, target_modules=r"layers\.\d", lora_dropout=0.0, scaling=0.7, lora_alpha=lora_alpha)
    model = nd.get_nara_model(base, cfg)
    perturb_(model)
    x = torch.randn(3, 5, 12)
    lam = torch.tensor([0.05, 0.5, 0.93])
    got = model(x, noise_level=lam)
    expected = _expected_tinynet(reference, model, x, lam, cfg)
    # another op order (per example, column form): ≈ 900 roundings on the path (hypernetwork 64 + 256 + 512, then
    # 3 layers of 12 + 4 + 4 and the head); nothing renormalises and the perturbed core C(λ) reaches ≈ 7: ≈ 1e-4
    tol = f32_tol(900, magnitude=8.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    # the noise level matters: a different λ for one example changes only that example (by ≈ 1)
    lam2 = lam.clone()
    lam2[1] = 0.2
    got2 = model(x, noise_level=lam2)
    torch.testing.assert_close(got2[[0, 2]], got[[0, 2]])
    assert (got2[1] - got[1]).abs().max() > 1000 * tol


def test_scalar_lambda_broadcasts_to_the_batch(tiny_net):
    model = nd.get_nara_model(tiny_net, nd.NaRAConfig(r=4, target_modules=["layers.1"], lora_dropout=0.0))
    perturb_(model)
    x = torch.randn(3, 12)  # 2-D input: [B, d]
    torch.testing.assert_close(model(x, noise_level=0.4), model(x, noise_level=torch.full((3,), 0.4)))
    torch.testing.assert_close(model(x, noise_level=torch.tensor(0.4)), model(x, noise_level=[0.4, 0.4, 0.4]))


def test_timestep_input_is_normalised_by_num_train_timesteps():
    outputs = []
    for noise_input, value in (("timestep", torch.tensor([250, 900])), ("noise_level", torch.tensor([0.25, 0.9]))):
        torch.manual_seed(0)
        cfg = nd.NaRAConfig(r=4, target_modules=["layers.1"], noise_input=noise_input, num_train_timesteps=1000)
        model = nd.get_nara_model(TinyNet(), cfg).eval()
        perturb_(model)
        outputs.append(model(torch.ones(2, 12), noise_level=value))
    torch.testing.assert_close(outputs[0], outputs[1])
    with pytest.raises(ValueError, match="timestep"):
        model_t = nd.get_nara_model(TinyNet(), nd.NaRAConfig(r=2, target_modules=["layers.1"], noise_input="timestep"))
        model_t(torch.ones(2, 12), noise_level=1001.0)


def test_gradients_reach_A_B_and_the_hypernetwork(tiny_net):
    model = nd.get_nara_model(tiny_net, nd.NaRAConfig(r=4, target_modules=["layers.0", "layers.2"]))
    perturb_(model)
    model.train()
    model(torch.randn(3, 12), noise_level=torch.rand(3)).pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("nara_A" in n for n in grads) and any("nara_B" in n for n in grads)
    assert any("nara_hypernet" in n and "generator" in n for n in grads)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
    # the base weights are frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n or "head" in n)


def test_hypernetwork_has_673536_parameters_at_rank_32_with_defaults():
    model = nd.get_nara_model(TinyNet(d=64), nd.NaRAConfig(r=32, target_modules=["layers.0"]))
    hn = nd.get_adapter(model)
    assert sum(p.numel() for p in hn.parameters()) == 673_536
    assert hn.embedding.W.shape == (1, 32) and not hn.embedding.W.requires_grad
    # the Fourier buffer has σ = 16: its spread is far above 1 (a σ = 1 or 2π-scaled buffer would differ)
    assert 4 < hn.embedding.W.std().item() < 40


def test_fourier_embedding_has_no_two_pi_factor():
    hn = nd.NoiseConditionedAdapter(nd.NaRAConfig(r=2))
    lam = torch.tensor([0.3])
    expected = torch.cat([torch.sin(0.3 * hn.embedding.W), torch.cos(0.3 * hn.embedding.W)], dim=-1)
    torch.testing.assert_close(hn.embedding(lam), expected)


def test_core_is_computed_once_per_forward_for_the_whole_batch():
    base = tiny_llama()
    model = nd.get_nara_model(base, nd.NaRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    calls = []
    nd.get_adapter(model).generator.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    model(torch.randint(0, 64, (3, 7)), noise_level=torch.rand(3))
    assert calls == [torch.Size([3, 16])]  # 8 adapted layers, one hypernetwork call with the whole batch


def test_identity_core_matches_peft_lora():
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = peft.get_peft_model(
        tiny_llama(seed=3), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, lora_dropout=0.0)
    )
    nara = nd.get_nara_model(
        tiny_llama(seed=3), nd.NaRAConfig(r=4, target_modules=targets, core="identity", lora_dropout=0.0)
    )
    lora_params = dict(lora.named_parameters())
    with torch.no_grad():
        for name, p in nara.named_parameters():
            if "nara_" in name:
                src = name.replace("nara_A", "lora_A").replace("nara_B", "lora_B")
                p.copy_(torch.randn_like(p) if "lora_B" in src else lora_params[src])
                lora_params[src].copy_(p)
    ids = torch.randint(0, 64, (2, 9))
    expected = lora(ids).logits
    got = nara(ids).logits  # the identity core needs no noise level
    assert not torch.allclose(expected, tiny_llama(seed=3)(ids).logits, atol=1e-3)  # the adapter is not a no-op
    # two implementations of s·B·A·x, free to order the ops differently: ≈ 730 roundings (2 layers × ≈ 330, the
    # final norm and head) behind the final RMSNorm, logits ≤ 0.5: ≈ 6e-6; the adapter itself moves logits by ≈ 0.5
    torch.testing.assert_close(got, expected, rtol=0, atol=f32_tol(730, magnitude=0.5))


def test_constant_core_is_learned_and_ignores_the_noise_level(tiny_net):
    model = nd.get_nara_model(
        tiny_net, nd.NaRAConfig(r=3, target_modules=["layers.0"], core="constant", lora_dropout=0.0)
    )
    hn = nd.get_adapter(model)
    assert [n for n, _ in hn.named_parameters()] == ["constant"]
    perturb_(model)
    x = torch.randn(2, 12)
    out = model(x)
    torch.testing.assert_close(model(x, noise_level=torch.tensor([0.1, 0.9])), out)
    layer = model.base_model.model.layers[0]
    C = (torch.eye(3) + 0.1 * hn.constant.detach()).expand(2, 3, 3)
    h = torch.tanh(
        layer.base_layer(x)
        + reference_lowrank(x, layer.nara_A["default"].weight.detach(), layer.nara_B["default"].weight.detach(), C, 1.0)
    )
    for lin in tiny_net.layers[1:]:
        h = torch.tanh(lin(h))
    # another op order: ≈ 66 roundings (12 + 12 + 3 + 3 in the adapted layer, 12 in each later layer and the head),
    # values ≤ 3 (the N(0, 1) input), no normalisation: ≈ 1e-5
    torch.testing.assert_close(out, tiny_net.head(h), rtol=0, atol=f32_tol(66, magnitude=3.0))


@pytest.mark.parametrize("embedding,dim", [("mlp", 16), ("raw", 1)])
def test_other_embeddings(embedding, dim):
    hn = nd.NoiseConditionedAdapter(nd.NaRAConfig(r=3, embedding=embedding, embedding_dim=16, hidden_dims=(8,)))
    assert hn.generator.layers[0].in_features == dim
    with torch.no_grad():
        hn.generator.layers[-1].weight.normal_()
    C = hn.core(torch.tensor([0.0, 1.0]))
    assert C.shape == (2, 3, 3) and not torch.allclose(C[0], C[1])
