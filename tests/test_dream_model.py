"""The native Dream model: Hub layout and size, numerics against a plain re-computation of Dream's forward, Auto
loading without remote code, left padding, and the training features (logits at chosen positions, checkpointing,
NaRA and peft)."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from builders import DREAM_HUB_7B, save_hub_dream, tiny_dream
from reference import f32_tol
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

import nara_diffusion as nd
from nara_diffusion.text.dream import DreamConfig, DreamModel, DreamTokenizer
from nara_diffusion.text.model_info import logits_shift
from nara_diffusion.text.objectives import align_logits

V = 20  # the tiny vocabulary (builders.V)
LAYER_PARAMS = (
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
)  # fmt: skip


def ids_and_mask(batch: int = 2, length: int = 9, pad_left: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad_left] = 0  # left padding in the first row
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# An independent re-computation of Dream's forward pass (Qwen2 with bidirectional attention), in float64.


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [B, H, L, hd], pos: [B, L]; rotate pairs (i, i + hd/2) by angle pos · θ^(−2i/hd)."""
    hd = x.shape[-1]
    angle = pos[:, None, :, None].double() * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_logits(model: DreamModel, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Unshifted logits [B, L, V]: row i is the prediction for token i + 1. Padding: keys masked out, real tokens at
    positions 0, 1, … (the Hub sampler's ``cumsum(mask) − 1``)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    nh, nkv, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    hd = cfg.hidden_size // nh
    b, length = ids.shape
    mask = torch.ones(b, length, dtype=torch.long) if mask is None else mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    bias = torch.zeros(b, 1, 1, length, dtype=torch.float64).masked_fill(mask[:, None, None, :] == 0, -math.inf)
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = {n: sd[f"model.layers.{i}.{n}"] for n in LAYER_PARAMS}
        h = _rms(x, p["input_layernorm.weight"], eps)
        q = (h @ p["self_attn.q_proj.weight"].T + p["self_attn.q_proj.bias"]).view(b, length, nh, hd).transpose(1, 2)
        k = (h @ p["self_attn.k_proj.weight"].T + p["self_attn.k_proj.bias"]).view(b, length, nkv, hd).transpose(1, 2)
        v = (h @ p["self_attn.v_proj.weight"].T + p["self_attn.v_proj.bias"]).view(b, length, nkv, hd).transpose(1, 2)
        q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1) @ v  # no causal mask
        x = x + att.transpose(1, 2).reshape(b, length, -1) @ p["self_attn.o_proj.weight"].T
        h = _rms(x, p["post_attention_layernorm.weight"], eps)
        gate, up = h @ p["mlp.gate_proj.weight"].T, h @ p["mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ p["mlp.down_proj.weight"].T
    x = _rms(x, sd["model.norm.weight"], eps)
    return x @ sd["lm_head.weight"].T


# float32 against the float64 reference: ≈ 400 roundings on the longest path (2 layers × ≈ 190: RMSNorm 32, q/k/v 32,
# QKᵀ 8, softmax 9, attn·V 9, o 32, RMSNorm 32, gate/up 32, down 48; then the norm and the head), logits ≤ 5 behind
# RMSNorm: ≈ 5e-5 (a wrong RoPE layout, θ, bias, mask or GQA grouping moves logits by ≈ 1)
TOL = f32_tol(400, magnitude=5.0)


# ---------------------------------------------------------------------------------------------------------------------


def test_tiny_model_has_the_hub_parameter_names():
    names = set(tiny_dream().state_dict())
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in LAYER_PARAMS}
    expected |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert names == expected
    tied = tiny_dream(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_7b_config_on_meta_has_the_hub_parameter_count_and_names():
    config = DreamConfig(**DREAM_HUB_7B)
    with torch.device("meta"):
        model = DreamModel(config)
    # Qwen2.5-7B's count: per layer q 3584²+3584, k and v 3584·512+512, o 3584², MLP 3·3584·18944, 2 norms 3584
    # (233,057,792) × 28, plus embedding and head 152064·3584 each, plus the final norm
    per_layer = 3584 * 3584 + 3584 + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert per_layer == 233_057_792
    assert sum(p.numel() for p in model.parameters()) == 28 * per_layer + 2 * 152064 * 3584 + 3584 == 7_615_616_512
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 28 * 12 + 3
    for i in (0, 27):
        layer = f"model.layers.{i}."
        assert shapes[layer + "self_attn.q_proj.weight"] == shapes[layer + "self_attn.o_proj.weight"] == (3584, 3584)
        assert shapes[layer + "self_attn.k_proj.weight"] == shapes[layer + "self_attn.v_proj.weight"] == (512, 3584)
        assert shapes[layer + "self_attn.q_proj.bias"] == (3584,) and shapes[layer + "self_attn.k_proj.bias"] == (512,)
        assert shapes[layer + "mlp.gate_proj.weight"] == shapes[layer + "mlp.up_proj.weight"] == (18944, 3584)
        assert shapes[layer + "mlp.down_proj.weight"] == (3584, 18944)
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (152064, 3584)
    assert "model.layers.28.self_attn.q_proj.weight" not in shapes
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # the Hub's tie_word_embeddings: false
    assert (config.mask_token_id, config.pad_token_id, config.use_cache) == (151666, 151643, False)


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_a_plain_recomputation_of_dreams_forward(tie):
    model = tiny_dream(tie_word_embeddings=tie)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (2, 9, V) and len(out.hidden_states) == 3
    torch.testing.assert_close(out.logits.double(), reference_logits(model, ids), rtol=0, atol=TOL)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % V
    with torch.no_grad():  # bidirectional: the last token changes the first position's logits
        assert (model(changed).logits[0, 0] - out.logits[0, 0]).abs().max() > 1e-3


def test_left_padding_with_a_mask_computes_each_row_as_if_alone():
    model = tiny_dream()
    ids, mask = ids_and_mask(pad_left=3)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, 3:]).logits
        # the Hub sampler's form: a [B, 1, L, L] bool mask (real query × real key) and its tok_idx positions
        real = mask.bool()
        hub_mask = real[:, None, :, None] & real[:, None, None, :]
        tok_idx = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        hub = model(ids, hub_mask, tok_idx).logits
    # the same computation but for the masked keys, which add exact zeros; reductions of another length may round
    # differently: ≈ 400 roundings at logits ≤ 5
    torch.testing.assert_close(padded[0, 3:], alone[0], rtol=0, atol=TOL)
    torch.testing.assert_close(padded[1], model(ids[1:]).logits[0], rtol=0, atol=TOL)
    torch.testing.assert_close(hub[real], padded[real], rtol=0, atol=TOL)
    torch.testing.assert_close(padded[real].double(), reference_logits(model, ids, mask)[real], rtol=0, atol=TOL)
    assert not torch.allclose(padded[0, 3:], model(ids[:1]).logits[0, 3:], atol=1e-3)  # the mask matters
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(mask)).logits, model(ids).logits)


def test_logits_positions_give_the_gathered_unshifted_rows_and_align_logits_shifts_them():
    model = tiny_dream()
    ids, mask = ids_and_mask()
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, [3, 5, 8]] = True
    positions[1, [0, 4]] = True
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        picked = model(ids, attention_mask=mask, logits_positions=positions).logits
    rows = positions.nonzero()
    # the same trunk; only the head's GEMM differs: one reduction over 32 at logits ≤ 5
    torch.testing.assert_close(picked, full[rows[:, 0], rows[:, 1]], rtol=0, atol=f32_tol(32, magnitude=5.0))
    with pytest.raises(ValueError, match="bool"):
        model(ids, logits_positions=positions.long())
    # Dream's shift as its sampler writes it: cat([logits[:, :1], logits[:, :-1]])
    assert logits_shift(model) == 1
    assert torch.equal(align_logits(full, 1), torch.cat([full[:, :1], full[:, :-1]], dim=1))


def test_hub_layout_round_trip_through_the_auto_classes_without_remote_code(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_remote_code(*args, **kwargs):
        raise AssertionError("tried to load remote code")

    monkeypatch.setattr(dynamic, "get_class_from_dynamic_module", no_remote_code)
    model = tiny_dream()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    folder = save_hub_dream(model, tmp_path / "hub")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "Dream" and saved["auto_map"] == DREAM_HUB_7B["auto_map"]
    assert set(saved) >= set(DREAM_HUB_7B) - {"torch_dtype"}  # every Hub field is written
    config = AutoConfig.from_pretrained(folder)
    assert type(config) is DreamConfig and config.mask_token_id == config.vocab_size - 1
    for auto in (AutoModel, AutoModelForMaskedLM):
        loaded = auto.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(loaded) is DreamModel
        with torch.no_grad():
            assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        DreamConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})


def test_the_hubs_tokenizer_folder_loads_without_remote_code(tmp_path, monkeypatch):
    """tokenizer_config.json names ``DreamTokenizer`` with an auto_map to remote code; the BPE files are Qwen2's."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "get_class_from_dynamic_module", lambda *a, **k: pytest.fail("remote code"))
    folder = save_hub_dream(tiny_dream(), tmp_path / "hub")
    letters = "abcdefghij"
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(letters)} | {"ab": 10}))
    (folder / "merges.txt").write_text("#version: 0.2\na b\n")
    # as on the Hub, the special tokens follow vocab.json's ids (151643 <|endoftext|> …, 151666 <|mask|>)
    specials = {"<|im_start|>": 11, "<|im_end|>": 12, "<|endoftext|>": 13, "<|mask|>": 14}
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "DreamTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "mask_token": "<|mask|>",
                "added_tokens_decoder": {
                    str(i): {
                        "content": t,
                        "special": True,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "single_word": False,
                    }
                    for t, i in specials.items()
                },
                "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>{% endif %}",
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, DreamTokenizer)
    assert (tokenizer.eos_token_id, tokenizer.mask_token_id) == (13, 14)
    assert tokenizer("abc", add_special_tokens=False)["input_ids"] == [10, 2]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>ab<|im_end|><|im_start|>"


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    ids, mask = ids_and_mask()
    targets = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(2))

    def loss_and_grads(model):
        logits = model(ids, attention_mask=mask).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = tiny_dream(scale=0.1).train(), tiny_dream(scale=0.1).train()
    checkpointed.gradient_checkpointing_enable()
    calls = []
    checkpointed.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    loss, grads = loss_and_grads(plain)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed)
    assert len(calls) == 2  # the layer ran again during backward: checkpointing is really on
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        # the same kernels; gradients summed from several uses may add in another order: float32 rounding along the
        # backward path (2 layers of ~20 chained reductions of length ≤ 48) at the scale of the weights
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=f32_tol(48, magnitude=1.0, depth=40))


def test_nara_attaches_to_every_block_linear_but_not_the_head_and_starts_at_the_base():
    model = tiny_dream()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    nara = nd.get_nara_model(model, nd.NaRAConfig(r=2, target_modules="all-linear", hidden_dims=[8]))
    adapted = {
        n.removeprefix("base_model.model.") for n, m in nara.named_modules() if isinstance(m, nd.core.NaRALinear)
    }
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    assert adapted == {f"model.layers.{i}.{p}" for i in range(2) for p in (*linears, "mlp.up_proj", "mlp.down_proj")}
    assert type(nara.get_base_model().lm_head) is nn.Linear
    assert logits_shift(nara) == 1  # the family's convention is seen through the wrapper
    with torch.no_grad():  # B starts at zero: the branch adds exact zeros, so the base's logits come back bit for bit
        assert torch.equal(nara(ids, attention_mask=mask, noise_level=torch.tensor([0.3, 0.9])).logits, base)
    lora = peft.get_peft_model(tiny_dream(), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert type(lora.get_base_model().lm_head) is nn.Linear and logits_shift(lora) == 1
    assert {
        n.removeprefix("base_model.model.") for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.Linear)
    } == adapted


def test_bf16_forward_is_finite_and_normalises_like_the_hub_code():
    model = tiny_dream(scale=0.1)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        full = model(ids).logits
        model = model.to(torch.bfloat16)
        half, half_masked = model(ids).logits, model(ids, attention_mask=mask).logits
    assert half.dtype == half_masked.dtype == torch.bfloat16
    assert torch.isfinite(half).all() and torch.isfinite(half_masked).all()
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()
    # RMSNorm: normalise in fp32, cast to bf16, then multiply by the (bf16) weight, as the Hub's DreamRMSNorm
    norm = model.model.norm
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)
