"""Native LLaDA: a configuration and model that load the Hub checkpoints ``GSAI-ML/LLaDA-8B-{Base,Instruct}``.

LLaDA is a masked diffusion language model: a Llama-style transformer whose attention is **bidirectional**
(no causal mask) and which predicts the tokens hidden behind mask tokens. It is not part of transformers, and the
remote code on the Hub does not run on transformers 5. This module re-implements the architecture, with the Hub's
config fields and parameter names, so that::

    import nara_diffusion.text.llada  # registers "llada" with AutoConfig, AutoModel and AutoModelForMaskedLM
    model = AutoModel.from_pretrained("path/to/LLaDA-8B-Instruct", dtype=torch.bfloat16)  # no trust_remote_code

gives a `LLaDAModelLM` with the checkpoint's weights. Parameter names (as in the checkpoint)::

    model.transformer.wte.weight                                    [embedding_size, d_model]
    model.transformer.blocks.{i}.attn_norm.weight                   [d_model]
    model.transformer.blocks.{i}.{q,k,v}_proj.weight                [n_heads*hd | n_kv_heads*hd, d_model]
    model.transformer.blocks.{i}.attn_out.weight                    [d_model, d_model]
    model.transformer.blocks.{i}.ff_norm.weight                     [d_model]
    model.transformer.blocks.{i}.{ff_proj,up_proj}.weight           [mlp_hidden_size, d_model]
    model.transformer.blocks.{i}.ff_out.weight                      [d_model, mlp_hidden_size]
    model.transformer.ln_f.weight                                   [d_model]
    model.transformer.ff_out.weight                                 [embedding_size, d_model]  (absent if weight_tying)

Numerics follow the authors' ``modeling_llada.py`` (the ``block_type="llama"`` path): RMSNorm normalises in fp32,
casts back to the input dtype and only then multiplies by the weight; RoPE uses the ``rotate_half`` layout with
sin/cos computed in fp32 (and applied in fp32 when ``rope_full_precision``); the MLP is
``ff_out(silu(ff_proj(x)) * up_proj(x))``; attention is ``F.scaled_dot_product_attention(is_causal=False)`` with keys
at padding positions masked out. Unlike the remote code, building a model never changes PyTorch's global SDPA backend
flags. Only the layout LLaDA-8B uses is implemented; other OLMo options raise ``NotImplementedError``.

Two additions for fast decoding (issue 17), neither of which changes the parameters, the config or training: a
forward with ``use_cache=True`` returns the K/V of every position (`LLaDACache`), and a later forward takes them back
(``cache=``, ``query_start=``) and runs only some positions (Fast-dLLM's prefix and dual caches; inference only).
And a padded row whose real tokens form one run (left or right padding) is computed exactly as the row alone: RoPE
positions counted from its first real token and attention over its real keys only (the reference rotates by absolute
column and masks the padding keys, the same up to float32 rounding), so a batch's outputs do not depend on the other
rows' lengths.
"""

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils import logging

from .auto_classes import register_model_type
from .kv_cache import LLaDACache, check_cache_call
from .token_ids import check_token_ids, token_ids_already_checked

logger = logging.get_logger(__name__)

__all__ = [
    "LLaDABlock",
    "LLaDACache",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAModelLM",
    "LLaDAOutput",
    "LLaDAPreTrainedModel",
    "LLaDARMSNorm",
]


class LLaDAConfig(PreTrainedConfig):
    """Configuration of a LLaDA model, with the field names of the Hub's ``config.json`` (inherited from OLMo).

    The defaults describe LLaDA-8B (Base and Instruct share one architecture). Fields of the Hub config that this
    implementation does not use (``init_device``, ``init_fn``, ``init_cutoff_factor``, ``precision``,
    ``flash_attention``, ``alibi_bias_max``, ``attention_layer_norm_with_affine``) are kept so that a config
    round-trips; any other key of a ``config.json`` (for example the Hub's ``auto_map``) is stored as an attribute
    and saved again. The standard transformers names ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` are properties over the LLaDA fields.

    ``use_cache`` is a declared field (default ``False``) so that ``config.use_cache`` exists on transformers 5, which
    drops undeclared generation keys from configs. The flag is never read: the model returns its K/V cache only when a
    call passes ``use_cache=True`` (the sampler's ``cache=``), so training never builds one.
    """

    model_type = "llada"

    # Transformer shape.
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: Optional[int] = 32
    multi_query_attention: Optional[bool] = None
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: Optional[int] = 12288
    vocab_size: int = 126464
    embedding_size: Optional[int] = 126464
    max_sequence_length: int = 4096
    # Layout and numerics.
    block_type: str = "llama"
    block_group_size: int = 1
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: Optional[bool] = False
    rms_norm_eps: float = 1e-5
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    rope: bool = True
    rope_theta: float = 500000.0
    rope_full_precision: bool = True
    alibi: bool = False
    alibi_bias_max: float = 8.0
    flash_attention: bool = False
    include_bias: bool = False
    include_qkv_bias: Optional[bool] = False
    input_emb_norm: bool = False
    scale_logits: bool = False
    weight_tying: bool = False
    # Dropout.
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    # Special tokens.
    mask_token_id: Optional[int] = 126336
    eos_token_id: Optional[int] = 126081
    pad_token_id: Optional[int] = 126081
    # Initialisation (only ``init_std`` is used) and training bookkeeping kept for round-trips.
    init_device: Optional[str] = None
    init_fn: str = "normal"
    init_std: float = 0.02
    init_cutoff_factor: Optional[float] = None
    precision: Optional[str] = None
    use_cache: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}).")
        if self.n_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of the number of key/value heads "
                f"({self.num_key_value_heads})."
            )
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size}).")

    # Standard transformers names. Setters make them usable as constructor keywords too.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        self.d_model = value

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        self.n_layers = value

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @num_attention_heads.setter
    def num_attention_heads(self, value: int) -> None:
        self.n_heads = value

    @property
    def num_key_value_heads(self) -> int:
        """Effective key/value heads: ``n_kv_heads``, or 1 / ``n_heads`` from ``multi_query_attention`` if unset."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @num_key_value_heads.setter
    def num_key_value_heads(self, value: int) -> None:
        self.n_kv_heads = value

    @property
    def intermediate_size(self) -> int:
        """MLP width: ``mlp_hidden_size``, or ``mlp_ratio * d_model`` when that is unset."""
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @intermediate_size.setter
    def intermediate_size(self, value: int) -> None:
        self.mlp_hidden_size = value


def _check_supported(config: LLaDAConfig) -> None:
    """Raise for OLMo options of the Hub config that change the architecture and are not implemented here."""
    unsupported = {
        "block_type": (config.block_type, "llama"),
        "activation_type": (config.activation_type, "silu"),
        "layer_norm_type": (config.layer_norm_type, "rms"),
        "rope": (config.rope, True),
        "alibi": (config.alibi, False),
        "attention_layer_norm": (config.attention_layer_norm, False),
        "block_group_size": (config.block_group_size, 1),
    }
    for name, (value, supported) in unsupported.items():
        if value != supported:
            raise NotImplementedError(f"LLaDA: {name}={value!r} is not implemented (only {supported!r}).")


class LLaDARMSNorm(nn.Module):
    """RMSNorm as in LLaDA: normalise in fp32 with autocast off, cast back to the input dtype, then scale.

    The weight is applied *after* the cast back (so with bf16 weights the product is taken in bf16), as the
    reference ``RMSLayerNorm`` does. ``x``: [..., size] -> [..., size].
    """

    def __init__(self, size: int, eps: float, affine: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            h = h.to(x.dtype)
        if self.weight is not None:
            h = self.weight * h
        if self.bias is not None:
            h = h + self.bias
        return h


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 RoPE tables for positions 0..seq_len-1, in the half-split layout. Returns (cos, sin), each [L, head_dim]."""
    with torch.autocast(device_type=device.type, enabled=False):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [B, H, L, hd] and ``k`` [B, H_kv, L, hd] by position; in fp32 if ``full_precision``, else in their
    dtype. Returns tensors of the input dtypes."""
    q_, k_ = (q.float(), k.float()) if full_precision else (q, k)
    with torch.autocast(device_type=q.device.type, enabled=False):
        cos, sin = cos.to(q_.dtype), sin.to(q_.dtype)
        q_ = q_ * cos + _rotate_half(q_) * sin
        k_ = k_ * cos + _rotate_half(k_) * sin
    return q_.to(q.dtype), k_.to(k.dtype)


class _Span(NamedTuple):
    """Rows (``[n]`` long, or None for all rows) whose real tokens are exactly columns ``first … end-1``."""

    rows: Optional[torch.Tensor]
    first: int
    end: int


def _spans(real: torch.Tensor) -> Optional[list[_Span]]:
    """Group the rows of a padding mask ``real`` [B, T] bool by their run of real tokens, or None when some row's real
    tokens are not one contiguous run (then the additive key mask is used). One host sync."""
    count = real.sum(1)
    first = real.int().argmax(1)
    cols = torch.arange(real.shape[1], device=real.device)
    runs = (cols >= first[:, None]) & (cols < (first + count)[:, None])
    if not bool((runs == real).all()) or not bool((count > 0).all()):
        return None
    bounds = torch.stack([first, first + count], 1).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (a, b) in enumerate(bounds):
        groups.setdefault((a, b), []).append(row)
    if len(groups) == 1:
        ((a, b),) = groups
        return [_Span(None, a, b)]
    return [_Span(torch.tensor(rows, device=real.device), a, b) for (a, b), rows in groups.items()]


def _attend_spans(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[_Span], start: int, dropout: float
) -> torch.Tensor:
    """Attention in which each row sees only its own real keys, computed on exactly those keys, so that a padded row
    gets the same numbers as the row alone (a masked key adds an exact zero, but a longer reduction may round
    differently). ``q`` [B, H, n, hd] at positions ``start …``, ``k``/``v`` [B, H, T, hd] → [B, H, n, hd]; queries
    outside a row's run (padding) get zeros."""
    out = q.new_zeros(q.shape)
    n = q.shape[2]
    for rows, first, end in spans:
        lo, hi = max(first - start, 0), min(end - start, n)
        if lo >= hi:
            continue
        qs, ks, vs = (q, k, v) if rows is None else (q[rows], k[rows], v[rows])
        part = F.scaled_dot_product_attention(
            qs[:, :, lo:hi], ks[:, :, first:end], vs[:, :, first:end], dropout_p=dropout, is_causal=False
        )
        if rows is None:
            out[:, :, lo:hi] = part
        else:
            out[rows, :, lo:hi] = part
    return out


class LLaDABlock(GradientCheckpointingLayer):
    """One pre-norm transformer block (the reference's ``LLaDALlamaBlock``) with bidirectional attention.

    ``x = x + attn_out(SDPA(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))`` with ``n = attn_norm(x)``, then
    ``x = x + ff_out(silu(ff_proj(m)) * up_proj(m))`` with ``m = ff_norm(x)``. Gradient checkpointing is switched on
    by ``model.gradient_checkpointing_enable()`` through `GradientCheckpointingLayer`.
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.d_model // config.n_heads
        self.rope_full_precision = config.rope_full_precision
        self.attention_dropout = config.attention_dropout
        d, hidden = config.d_model, config.intermediate_size
        bias, qkv_bias = config.include_bias, bool(config.include_bias or config.include_qkv_bias)
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm

        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps, config.layer_norm_with_affine, norm_bias)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps, config.layer_norm_with_affine, norm_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.ff_out = nn.Linear(hidden, d, bias=bias)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: Optional[torch.Tensor] = None,
        spans: Optional[list[_Span]] = None,
        past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start: int = 0,
        present: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """``hidden_states``: [B, n, d_model], positions ``start … start+n-1`` of the sequence; ``cos``/``sin``: fp32
        [n, head_dim] or per row [B, 1, n, head_dim]. Keys: either ``key_mask`` bool [B, 1, 1, T] (True = attend) or
        ``spans`` (each row attends to its one contiguous run of real tokens, see `_spans`) or neither (attend
        everywhere). ``past``: cached (keys, values) [B, n_kv_heads, T_c, head_dim] after RoPE; the keys are the
        cached ones before ``start``, the fresh ones, then the cached ones after ``start + n``. ``present``: if given,
        this layer's (keys, values) over the whole sequence are appended to it. Returns [B, n, d_model]."""
        bsz, seq_len, _ = hidden_states.shape
        h = self.attn_norm(hidden_states)
        q = self.q_proj(h).view(bsz, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(bsz, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(bsz, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin, self.rope_full_precision)
        if past is not None:
            k = torch.cat([past[0][:, :, :start], k, past[0][:, :, start + seq_len :]], dim=2)
            v = torch.cat([past[1][:, :, :start], v, past[1][:, :, start + seq_len :]], dim=2)
        if present is not None:
            present.append((k, v))
        if self.n_kv_heads != self.n_heads:  # GQA: query head i reads key/value head i // (n_heads / n_kv_heads)
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        dropout = self.attention_dropout if self.training else 0.0
        if spans is not None:
            attn = _attend_spans(q, k, v, spans, start, dropout)
        else:
            bias = None
            if key_mask is not None:  # additive bias with a finite minimum, as the reference: no NaN on all-pad rows
                bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
                bias = bias.masked_fill(~key_mask, torch.finfo(q.dtype).min)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=False)
        attn = attn.transpose(1, 2).reshape(bsz, seq_len, self.n_heads * self.head_dim)
        hidden_states = hidden_states + self.dropout(self.attn_out(attn))

        h = self.ff_norm(hidden_states)
        h = self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))
        return hidden_states + self.dropout(h)


class LLaDAModel(nn.Module):
    """The LLaDA trunk: embedding, blocks and final norm (plus the LM head weight ``transformer.ff_out``, which lives
    here to keep the Hub's parameter names; `LLaDAModelLM` applies it)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        num_embeddings = config.embedding_size or config.vocab_size
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(num_embeddings, config.d_model),
                "emb_drop": nn.Dropout(config.embedding_dropout),
                "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
                "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps, config.layer_norm_with_affine, norm_bias),
            }
        )
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, num_embeddings, bias=config.include_bias)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        cache: Optional[LLaDACache] = None,
        use_cache: bool = False,
        query_start: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]], Optional[LLaDACache]]:
        """Returns the normalised last hidden state [B, n, d_model], if asked the hidden states (the input of each
        block, then the final normalised state: n_layers + 1 tensors of [B, n, d_model], as the reference) and, with
        ``use_cache``, the K/V of every position of the sequence (`LLaDACache`). See `LLaDAModelLM.forward` for the
        cache arguments and the attention mask.

        ``input_ids`` on the CPU outside [0, vocab_size) raise a ValueError naming them (one min/max reduction).
        Not checked: ids on an accelerator (the check would cost a host sync per forward; `generate`,
        `mc_loglikelihood` and `noise_profile` check theirs once, on entry), inside `token_ids_checked` (the sampler
        has checked its prompt) and under ``torch.compile``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if (
            input_ids is not None
            and input_ids.device.type == "cpu"
            and not token_ids_already_checked()
            and not torch.compiler.is_compiling()
        ):
            check_token_ids(input_ids, min(self.config.vocab_size, self.transformer["wte"].num_embeddings))
        x = self.transformer["wte"](input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.input_emb_norm:
            x = x * (self.config.d_model**0.5)
        x = self.transformer["emb_drop"](x)
        bsz, seq_len = x.shape[:2]
        start, total = check_cache_call(
            cache,
            query_start,
            num_layers=self.config.n_layers,
            batch_size=bsz,
            seq_len=seq_len,
            training=self.training,
            family="LLaDA",
        )

        key_mask, spans, first = None, None, None
        if attention_mask is not None:
            if attention_mask.shape != (bsz, total):
                raise ValueError(
                    f"attention_mask must be [B, L] = {(bsz, total)} (L: the whole sequence, cached positions "
                    f"included), got {tuple(attention_mask.shape)}."
                )
            real = attention_mask.bool()
            if not bool(real.all()):  # all ones: no mask at all, so SDPA may use flash kernels
                spans = _spans(real)
                if spans is None:
                    key_mask = real[:, None, None, :]
                elif any(span.first for span in spans):
                    first = real.int().argmax(1)

        head_dim = self.config.d_model // self.config.n_heads
        cos, sin = rotary_cos_sin(total, head_dim, float(self.config.rope_theta), x.device)
        if first is None:
            cos, sin = cos[start : start + seq_len], sin[start : start + seq_len]
        else:  # left padding: each row's real tokens at positions 0, 1, … as they would be alone (RoPE is relative)
            pos = (torch.arange(start, start + seq_len, device=x.device)[None] - first[:, None]).clamp(min=0)
            cos, sin = cos[pos][:, None], sin[pos][:, None]
        all_hidden = [] if output_hidden_states else None
        present: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = [] if use_cache else None
        for i, block in enumerate(self.transformer["blocks"]):
            if all_hidden is not None:
                all_hidden.append(x)
            past = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, cos, sin, key_mask, spans=spans, past=past, start=start, present=present)
        x = self.transformer["ln_f"](x)
        if all_hidden is not None:
            all_hidden.append(x)
        new_cache = None if present is None else LLaDACache([k for k, _ in present], [v for _, v in present])
        return x, (tuple(all_hidden) if all_hidden is not None else None), new_cache


@dataclass
class LLaDAOutput(MaskedLMOutput):
    """`MaskedLMOutput` plus ``cache``, the `LLaDACache` of a call with ``use_cache=True``."""

    cache: Optional[LLaDACache] = None


class LLaDAPreTrainedModel(PreTrainedModel):
    config: LLaDAConfig
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LLaDABlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, ``init_std``) for linear and embedding weights, zeros for biases, ones for norm weights."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LLaDARMSNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """LLaDA with its LM head, loadable from the Hub checkpoints (``AutoModel`` and ``AutoModelForMaskedLM``).

    The trunk is ``self.model`` (a `LLaDAModel`), so parameter names carry the ``model.`` prefix of the checkpoint.
    """

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        _check_supported(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer["wte"]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer["wte"] = value

    def get_output_embeddings(self) -> Union[nn.Linear, nn.Embedding]:
        """The LM head ``model.transformer.ff_out`` (the embedding itself when ``weight_tying``)."""
        if self.config.weight_tying:
            return self.model.transformer["wte"]
        return self.model.transformer["ff_out"]

    def set_output_embeddings(self, value: Union[nn.Linear, nn.Embedding]) -> None:
        self.model.transformer["wte" if self.config.weight_tying else "ff_out"] = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        logits_positions: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[LLaDACache] = None,
        use_cache: Optional[bool] = None,
        query_start: Optional[int] = None,
        **kwargs: Any,
    ) -> Union[LLaDAOutput, tuple]:
        """Bidirectional forward pass.

        Args:
            input_ids: [B, L] token ids in [0, vocab_size) (or give ``inputs_embeds`` [B, L, d_model] instead); on
                the CPU an id outside raises a ValueError that names it (see `LLaDAModel.forward`).
            attention_mask: [B, L], 1 for real tokens and 0 for padding; keys at padding positions are ignored.
                ``None`` or all ones means no mask (SDPA can then pick its flash kernel).
            logits_positions: optional bool [B, L]. If given, the LM head runs only there and ``logits`` is [N, V]
                with ``N = logits_positions.sum()``, rows in the order of ``logits_positions.nonzero()`` (that is,
                ``full_logits[logits_positions]``). Training uses this to avoid full-vocabulary logits.
            output_hidden_states: also return the input of every block and the final normalised hidden state.
            return_dict: return a `LLaDAOutput` (default) or a tuple.
            cache: an `LLaDACache` [B, …, T_c, …] from an earlier call with ``use_cache=True`` (inference
                only). ``input_ids`` [B, n] are then positions ``query_start … query_start+n-1`` of the sequence, and
                they attend to the cached K/V before ``query_start``, to their own fresh K/V and to the cached K/V
                after ``query_start + n``: the cache either ends at ``query_start`` (Fast-dLLM's prefix cache) or
                covers the input (its dual cache). ``attention_mask`` and ``logits_positions`` then cover the whole
                sequence [B, T] and the input [B, n] respectively. With fresh K/V (those a full forward of the same
                sequence computes) the result equals the full forward's at these positions up to float32 rounding;
                LLaDA attends both ways, so K/V cached before the other positions changed are an approximation.
            use_cache: also return ``cache``, the K/V of every position (cached ones included). Ignored
                while training with gradients (a trainer's ``use_cache=True`` changes nothing).
            query_start: first position of the input when ``cache`` is given; default: the cache's length.
            **kwargs: ``past_key_values`` is read as ``cache`` (the older transformers name); ``labels`` and
                other trainer keywords are accepted and ignored (``labels`` with a warning: no loss is computed
                here). ``position_ids``, an ``attention_bias`` and ``output_attentions`` are not supported and raise.

        A left-padded row (or any row whose real tokens are one contiguous run) is computed as if it were alone: its
        tokens take RoPE positions 0, 1, … and attention runs over its real keys only. RoPE is relative, so this is
        the reference's result (which rotates padded rows by absolute positions) up to float32 rounding, and it
        makes a batch's tokens independent of the other rows' lengths.

        Returns:
            `LLaDAOutput` with ``logits`` [B, L, V] (or [N, V]), V = ``embedding_size``, ``hidden_states`` and, with
            ``use_cache``, ``cache``.
        """
        for name in ("position_ids", "attention_bias", "output_attentions"):
            if kwargs.get(name) not in (None, False):
                raise ValueError(f"LLaDA does not support `{name}`.")
        if kwargs.get("labels") is not None:
            warnings.warn("LLaDAModelLM computes no loss: `labels` is ignored.", UserWarning, stacklevel=2)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else bool(self.config.output_hidden_states)
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if cache is None:
            cache = kwargs.get("past_key_values")
        use_cache = bool(use_cache) and not (self.training and torch.is_grad_enabled())
        hidden, all_hidden, new_cache = self.model(
            input_ids, attention_mask, inputs_embeds, output_hidden_states, cache, use_cache, query_start
        )
        if logits_positions is not None:
            if logits_positions.dtype != torch.bool or logits_positions.shape != hidden.shape[:2]:
                raise ValueError(f"logits_positions must be a bool tensor of shape {tuple(hidden.shape[:2])}.")
            hidden = hidden[logits_positions]  # [N, d_model]
        if self.config.weight_tying:
            logits = F.linear(hidden, self.model.transformer["wte"].weight)
        else:
            logits = self.model.transformer["ff_out"](hidden)
        if self.config.scale_logits:
            logits = logits * (self.config.d_model**-0.5)

        output = LLaDAOutput(logits=logits, hidden_states=all_hidden, cache=new_cache)
        return output if return_dict else output.to_tuple()


register_model_type(LLaDAConfig, LLaDAModelLM)
