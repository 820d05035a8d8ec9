"""The native LLaDA model: Hub layout and size, numerics against a plain re-computation, Auto loading without remote
code, and the training features (logits at chosen positions, checkpointing, bf16, peft)."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from builders import tiny_llada_config
from reference import f32_tol
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from nara_diffusion.text.llada import LLaDAConfig, LLaDAModelLM

BLOCK_PARAMS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm")

# LLaDA-8B (Base and Instruct), as in the Hub's config.json.
HUB_8B = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}


def tiny_config(**overrides) -> LLaDAConfig:
    """Hub field values with tiny sizes; 4 query heads share 2 key/value heads (GQA) unless overridden."""
    fields = {k: v for k, v in HUB_8B.items() if k not in ("auto_map", "torch_dtype", "transformers_version")}
    fields.update(
        d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=128, embedding_size=128,
        max_sequence_length=64, rope_theta=10000.0, mask_token_id=120, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    fields.update(overrides)
    return tiny_llada_config(**fields)


def tiny_model(seed: int = 0, scale: float = 0.25, **overrides) -> LLaDAModelLM:
    """A tiny LLaDA with weights large enough for sharp attention (so position and mask errors show in the logits)
    and non-trivial norm weights."""
    torch.manual_seed(seed)
    model = LLaDAModelLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name or "ln_f" in name else scale * torch.randn_like(p))
    return model


def ids_and_mask(batch: int = 2, length: int = 9, pad_last: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad_last] = 0  # left padding in the first row
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# An independent re-computation of LLaDA's forward pass, in float64, from the state dict.


def _ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _ref_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [B, H, L, hd]; rotate pairs (i, i + hd/2) by angle pos * theta^(-2i/hd)."""
    length, hd = x.shape[-2:]
    angle = torch.arange(length, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, hd, 2) / hd)[None]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_logits(model: LLaDAModelLM, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    cfg = model.config
    sd = {k.removeprefix("model.transformer."): v.double() for k, v in model.state_dict().items()}
    nh, nkv, hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, cfg.rms_norm_eps
    b, length = ids.shape
    x = sd["wte.weight"][ids]
    bias = torch.zeros(b, 1, 1, length, dtype=torch.float64)
    if mask is not None:
        bias = bias.masked_fill(mask[:, None, None, :] == 0, -math.inf)
    for i in range(cfg.n_layers):
        p = {n: sd[f"blocks.{i}.{n}.weight"] for n in BLOCK_PARAMS}
        h = _ref_rmsnorm(x, p["attn_norm"], eps)
        q = (h @ p["q_proj"].T).view(b, length, nh, hd).transpose(1, 2)
        k = (h @ p["k_proj"].T).view(b, length, nkv, hd).transpose(1, 2)
        v = (h @ p["v_proj"].T).view(b, length, nkv, hd).transpose(1, 2)
        q, k = _ref_rope(q, cfg.rope_theta), _ref_rope(k, cfg.rope_theta)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1) @ v  # no causal mask
        x = x + att.transpose(1, 2).reshape(b, length, -1) @ p["attn_out"].T
        h = _ref_rmsnorm(x, p["ff_norm"], eps)
        gate, up = h @ p["ff_proj"].T, h @ p["up_proj"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ p["ff_out"].T
    x = _ref_rmsnorm(x, sd["ln_f.weight"], eps)
    head = sd["wte.weight"] if cfg.weight_tying else sd["ff_out.weight"]
    return x @ head.T


# ---------------------------------------------------------------------------------------------------------------------


def test_tiny_model_has_the_hub_parameter_names():
    names = set(tiny_model().state_dict())
    expected = {f"model.transformer.blocks.{i}.{p}.weight" for i in range(2) for p in BLOCK_PARAMS}
    expected |= {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    assert names == expected
    tied = set(tiny_model(weight_tying=True).state_dict())
    assert tied == expected - {"model.transformer.ff_out.weight"}


def test_8b_config_on_meta_has_exactly_the_hub_parameter_count_and_names():
    config = LLaDAConfig(**HUB_8B)
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 32 * 9 + 3
    for i in (0, 31):
        block = f"model.transformer.blocks.{i}."
        assert shapes[block + "q_proj.weight"] == shapes[block + "k_proj.weight"] == (4096, 4096)
        assert shapes[block + "v_proj.weight"] == shapes[block + "attn_out.weight"] == (4096, 4096)
        assert shapes[block + "ff_proj.weight"] == shapes[block + "up_proj.weight"] == (12288, 4096)
        assert shapes[block + "ff_out.weight"] == (4096, 12288)
        assert shapes[block + "attn_norm.weight"] == shapes[block + "ff_norm.weight"] == (4096,)
    assert shapes["model.transformer.wte.weight"] == shapes["model.transformer.ff_out.weight"] == (126464, 4096)
    assert shapes["model.transformer.ln_f.weight"] == (4096,)
    assert "model.transformer.blocks.32.q_proj.weight" not in shapes
    # The standard transformers names read the LLaDA fields; use_cache exists (transformers 5 drops undeclared keys).
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 32, 32)
    assert (config.num_key_value_heads, config.intermediate_size, config.use_cache) == (32, 12288, False)
    assert LLaDAConfig(hidden_size=64, n_heads=4, num_key_value_heads=2).d_model == 64


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("tying", [False, True])
def test_forward_matches_a_plain_recomputation(with_mask, tying):
    model = tiny_model(weight_tying=tying)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        out = model(ids, attention_mask=mask if with_mask else None, output_hidden_states=True)
    expected = reference_logits(model, ids, mask if with_mask else None)
    assert out.logits.shape == (2, 9, 128)
    keep = mask.bool() if with_mask else torch.ones_like(mask, dtype=torch.bool)  # padded queries: unspecified
    # float32 against the float64 reference: ≈ 530 roundings (2 blocks × ≈ 234: RMSNorm, q/k/v, QKᵀ, softmax, attn·V,
    # out, RMSNorm, gate/up, down; then ln_f and the head), logits ≤ 5 behind RMSNorm: ≈ 5e-5 (a wrong mask or RoPE
    # layout moves logits by ≈ 1)
    torch.testing.assert_close(out.logits[keep].double(), expected[keep], rtol=0, atol=f32_tol(530, magnitude=5.0))
    assert len(out.hidden_states) == model.config.n_layers + 1
    if with_mask:  # the mask matters, and an all-ones mask is the same as none
        assert not torch.allclose(out.logits[0, 3:], model(ids[:1]).logits[0, 3:], atol=1e-3)
        torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(mask)).logits, model(ids).logits)


def test_attention_is_bidirectional():
    model = tiny_model()
    ids, _ = ids_and_mask(batch=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 128
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-3


def test_logits_positions_give_the_gathered_rows():
    model = tiny_model()
    ids, mask = ids_and_mask()
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, [1, 5, 8]] = True
    positions[1, [0, 4]] = True
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        picked = model(ids, attention_mask=mask, logits_positions=positions).logits
    assert picked.shape == (5, 128)
    rows = positions.nonzero()
    # the same trunk; only the head's GEMM differs (5 gathered rows instead of 18): one reduction over d_model = 32,
    # logits ≤ 5: ≈ 1e-5 (a wrong row order moves them by ≈ 1)
    torch.testing.assert_close(picked, full[rows[:, 0], rows[:, 1]], rtol=0, atol=f32_tol(32, magnitude=5.0))
    with pytest.raises(ValueError, match="bool"):
        model(ids, logits_positions=positions.long())


def test_auto_classes_load_saved_and_hub_style_checkpoints_without_remote_code(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_remote_code(*args, **kwargs):
        raise AssertionError("tried to load remote code")

    monkeypatch.setattr(dynamic, "get_class_from_dynamic_module", no_remote_code)
    model = tiny_model()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "ours")
    for auto in (AutoModel, AutoModelForMaskedLM):
        loaded = auto.from_pretrained(tmp_path / "ours").eval()
        assert type(loaded) is LLaDAModelLM
        with torch.no_grad():
            assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)

    # The Hub's config.json: every OLMo field, an auto_map to remote code that is not there, bf16 dtype.
    model.save_pretrained(tmp_path / "hub")
    hub_config = {**HUB_8B, **{k: v for k, v in tiny_config().to_dict().items() if k in HUB_8B}}
    hub_config.update(auto_map=HUB_8B["auto_map"], torch_dtype="bfloat16", transformers_version="4.46.3")
    hub_config["unknown_extra"] = [1, 2]
    (tmp_path / "hub" / "config.json").write_text(json.dumps(hub_config))
    config = AutoConfig.from_pretrained(tmp_path / "hub")
    assert type(config) is LLaDAConfig and config.use_cache is False and config.precision == "amp_bf16"
    loaded = AutoModel.from_pretrained(tmp_path / "hub", dtype=torch.float32).eval()
    assert type(loaded) is LLaDAModelLM
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["auto_map"] == HUB_8B["auto_map"] and saved["unknown_extra"] == [1, 2]
    assert saved["init_fn"] == "mitchell" and saved["use_cache"] is False and saved["d_model"] == 32


def test_building_and_running_leaves_global_sdpa_flags_alone():
    flash, mem_efficient, math_ = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    # Start from the opposite of what the Hub code forces (flash on, memory-efficient off).
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    try:
        model = tiny_model()
        ids, mask = ids_and_mask()
        with torch.no_grad():
            model(ids)
            model(ids, attention_mask=mask)
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled() == math_
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
        torch.backends.cuda.enable_mem_efficient_sdp(mem_efficient)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    ids, mask = ids_and_mask()
    targets = torch.randint(0, 128, ids.shape, generator=torch.Generator().manual_seed(2))

    def loss_and_grads(model):
        logits = model(ids, attention_mask=mask).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = tiny_model(scale=0.1).train()
    checkpointed = tiny_model(scale=0.1).train()
    checkpointed.gradient_checkpointing_enable()
    calls = []
    checkpointed.model.transformer["blocks"][0].q_proj.register_forward_hook(lambda *_: calls.append(1))
    loss, grads = loss_and_grads(plain)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed)
    assert len(calls) == 2  # the block ran again during backward: checkpointing is really on
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        # Recomputation runs the same kernels, but gradients that several uses of a tensor add up may be summed in
        # another order: allow float32 rounding along the backward path (2 blocks of ~20 chained reductions of
        # length ≤ 48, at the size of this gradient); a wrong recomputation changes gradients by O(their size).
        scale = max(float(grads[name].abs().max()), 1e-30)
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=f32_tol(48, magnitude=scale, depth=40))


def test_bf16_forward_is_finite_and_normalises_like_the_reference():
    model = tiny_model(scale=0.1)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        full = model(ids).logits
        model = model.to(torch.bfloat16)
        half = model(ids).logits
        half_masked = model(ids, attention_mask=mask).logits
    assert half.dtype == half_masked.dtype == torch.bfloat16
    assert torch.isfinite(half).all() and torch.isfinite(half_masked).all()
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()
    # RMSNorm: normalise in fp32, cast to bf16, then multiply by the (bf16) weight, as the Hub code does.
    norm = model.model.transformer["ln_f"]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


def test_peft_all_linear_wraps_the_block_projections_but_not_the_lm_head():
    model = tiny_model()
    ids, _ = ids_and_mask()
    with torch.no_grad():
        base = model(ids).logits
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    lora = {
        n.removeprefix("base_model.model.")
        for n, m in wrapped.named_modules()
        if isinstance(m, peft.tuners.lora.Linear)
    }
    expected = {f"model.transformer.blocks.{i}.{p}" for i in range(2) for p in BLOCK_PARAMS if "norm" not in p}
    assert lora == expected
    assert type(wrapped.get_base_model().model.transformer["ff_out"]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, base)  # LoRA starts at zero
