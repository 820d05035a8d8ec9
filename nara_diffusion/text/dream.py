"""Native Dream: a configuration and model that load the Hub checkpoints ``Dream-org/Dream-v0-{Base,Instruct}-7B``.

Dream is a masked diffusion language model initialised from Qwen2.5: the Qwen2 transformer (RMSNorm, RoPE, grouped
query attention, SwiGLU MLP, biases on q/k/v only) run with **bidirectional** attention. Because it starts from an
autoregressive model, its logits are **shifted by one**: the token at position i is predicted by the output at
position i−1 (`DREAM_LOGITS_SHIFT`; the model returns unshifted logits, as the Hub code does, and the objectives
and samplers apply the shift through `nara_diffusion.text.model_info.logits_shift`). The Hub ships remote code; this
module re-implements it with the Hub's config fields and parameter names, so that::

    import nara_diffusion.text.dream  # registers "Dream" with AutoConfig, AutoModel and AutoModelForMaskedLM
    model = AutoModel.from_pretrained("Dream-org/Dream-v0-Instruct-7B", dtype=torch.bfloat16)  # no remote code

gives a `DreamModel` with the checkpoint's weights. Parameter names (as in the checkpoint)::

    model.embed_tokens.weight                                  [vocab_size, hidden]
    model.layers.{i}.input_layernorm.weight                    [hidden]
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}      [heads*hd | kv_heads*hd, hidden], [.. ]
    model.layers.{i}.self_attn.o_proj.weight                   [hidden, heads*hd]
    model.layers.{i}.post_attention_layernorm.weight           [hidden]
    model.layers.{i}.mlp.{gate,up}_proj.weight                 [intermediate, hidden]
    model.layers.{i}.mlp.down_proj.weight                      [hidden, intermediate]
    model.norm.weight                                          [hidden]
    lm_head.weight                                             [vocab_size, hidden]  (tied to the embedding if asked)

Numerics follow the Hub's ``modeling_dream.py``: RMSNorm normalises in fp32, casts back, then multiplies by the
weight; RoPE tables are computed in fp32 and applied in the activations' dtype; attention is
``F.scaled_dot_product_attention(is_causal=False)``. With a ``[B, L]`` attention mask, padding keys are masked out and
each row's real tokens take RoPE positions 0, 1, … (the Hub's ``tok_idx = cumsum(mask) − 1``), so a left-padded row
computes what the row alone computes, up to float32 rounding. The Hub code ignores ``use_sliding_window`` under SDPA,
and so does this one.

One addition for fast decoding (Fast-dLLM's prefix and dual caches, issue 17), which changes neither the parameters,
the config nor training: a forward with ``use_cache=True`` returns the K/V of every position (a `KVCache`, the class
native LLaDA uses), and a later forward takes them back (``cache=``, ``query_start=``) and runs only some positions
(inference only). The logits stay unshifted: the sampler runs the position before the block too
(`nara_diffusion.text.sampler`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Tokenizer,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils import logging

from .auto_classes import register_model_type
from .kv_cache import KVCache, check_cache_call
from .token_ids import check_token_ids, token_ids_already_checked

logger = logging.get_logger(__name__)

__all__ = [
    "DREAM_LOGITS_SHIFT",
    "DreamBaseModel",
    "DreamConfig",
    "DreamDecoderLayer",
    "DreamModel",
    "DreamOutput",
    "DreamPreTrainedModel",
    "DreamRMSNorm",
    "DreamTokenizer",
]

#: Dream predicts the token at position i from the output at position i − 1 (position 0 from itself).
DREAM_LOGITS_SHIFT = 1


class DreamConfig(PreTrainedConfig):
    """Configuration of a Dream model, with the field names and defaults of the Hub's ``configuration_dream.py``.

    The defaults are the Hub class's (a generic Qwen shape); Dream-v0-7B's ``config.json`` sets hidden 3584,
    28 layers, 28 heads, 4 key/value heads, intermediate 18944, vocabulary 152064, ``rope_theta`` 1e6 and untied
    embeddings. Keys a ``config.json`` carries beyond these (``auto_map``, ``architectures``) are kept and saved
    again. ``rope_scaling`` must be null (as in every Dream checkpoint); other RoPE types are not implemented.
    """

    model_type = "Dream"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    use_sliding_window: bool = False
    sliding_window: Optional[int] = 4096
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    mask_token_id: Optional[int] = 151666
    pad_token_id: Optional[int] = 151643
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def __post_init__(self, **kwargs: Any) -> None:
        scaling = kwargs.pop("rope_scaling", None)
        if scaling is not None:
            raise NotImplementedError(f"Dream: rope_scaling={scaling!r} is not implemented (only null).")
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not an activation transformers knows.")

    def to_dict(self) -> dict[str, Any]:
        """As saved: with the Hub's ``rope_scaling: null`` (transformers 5 no longer writes the key)."""
        out = super().to_dict()
        out.setdefault("rope_scaling", None)
        out.pop("rope_parameters", None)
        return out


class DreamRMSNorm(nn.Module):
    """RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight. [..., d] -> [..., d]."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) for ``positions`` [B, L] (or [L]), computed in fp32 and cast to ``dtype``: [B, 1, L, hd]."""
    with torch.autocast(device_type=positions.device.type, enabled=False):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
        pos = positions if positions.dim() == 2 else positions[None]
        freqs = pos.float()[..., None] * inv_freq  # [B, L, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DreamAttention(nn.Module):
    """Bidirectional grouped-query attention with RoPE; q/k/v have biases, o_proj has none."""

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_dropout
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: Optional[torch.Tensor],
        past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start: int = 0,
        present: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """``x`` [B, n, d], positions ``start … start+n-1``; ``cos``/``sin`` [B|1, 1, n, hd]; ``bias`` additive
        [B, 1, 1|n, T] or None. ``past``: cached (keys, values) [B, kv_heads, T_c, hd] after RoPE; the keys are the
        cached ones before ``start``, the fresh ones, then the cached ones after ``start + n``. ``present``: if given,
        this layer's (keys, values) over the whole sequence are appended to it. Returns [B, n, d]."""
        bsz, length, _ = x.shape
        q = self.q_proj(x).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0][:, :, :start], k, past[0][:, :, start + length :]], dim=2)
            v = torch.cat([past[1][:, :, :start], v, past[1][:, :, start + length :]], dim=2)
        if present is not None:  # before GQA's repetition: the cache holds kv_heads heads
            present.append((k, v))
        if self.num_key_value_heads != self.num_heads:  # query head i reads key/value head i // groups
            groups = self.num_heads // self.num_key_value_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim))


class DreamMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``.
    Gradient checkpointing is switched on by ``model.gradient_checkpointing_enable()``."""

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start: int = 0,
        present: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """See `DreamAttention.forward` for the arguments. [B, n, d] -> [B, n, d]."""
        attn = self.self_attn(self.input_layernorm(hidden_states), cos, sin, bias, past, start, present)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DreamPreTrainedModel(PreTrainedModel):
    config: DreamConfig
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["DreamDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, ``initializer_range``) for linear and embedding weights (the padding row zeroed), zero biases,
        unit norm weights."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, DreamRMSNorm):
            init.ones_(module.weight)


class DreamBaseModel(nn.Module):
    """The trunk: embedding (``padding_idx`` = ``pad_token_id``, as the Hub's), decoder layers, final norm."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        pad = (
            config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < config.vocab_size else None
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, pad)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        inputs_embeds: Optional[torch.Tensor],
        output_hidden_states: bool,
        cache: Optional[KVCache] = None,
        use_cache: bool = False,
        query_start: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]], Optional[KVCache]]:
        """Returns the normalised last hidden state [B, n, hidden], if asked the hidden states (the input of each
        layer, then the final normalised state: num_hidden_layers + 1 tensors), as the Hub code, and with
        ``use_cache`` the K/V of every position of the sequence. See `DreamModel.forward` for the cache arguments."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if (
            input_ids is not None
            and input_ids.device.type == "cpu"
            and not token_ids_already_checked()
            and not torch.compiler.is_compiling()
        ):
            check_token_ids(input_ids, self.config.vocab_size)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, length = x.shape[:2]
        start, total = check_cache_call(
            cache,
            query_start,
            num_layers=self.config.num_hidden_layers,
            batch_size=bsz,
            seq_len=length,
            training=self.training,
            family="Dream",
        )
        if cache is not None and torch.is_tensor(attention_mask) and attention_mask.dim() != 2:
            raise ValueError("With a cache, attention_mask must be [B, L] over the whole sequence (1 = real token).")
        bias, pads = _attention_bias(attention_mask, bsz, total, x.dtype)
        if position_ids is None:
            # left padding: each row's real tokens at positions 0, 1, … (the Hub sampler's tok_idx)
            if pads is not None:
                position_ids = (pads.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + length]
            else:
                position_ids = torch.arange(start, start + length)
        position_ids = position_ids.to(x.device)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rope_tables(position_ids, head_dim, float(self.config.rope_theta), x.dtype)
        all_hidden: Optional[list[torch.Tensor]] = [] if output_hidden_states else None
        present: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(x)
            past = None if cache is None else (cache.keys[i], cache.values[i])
            x = layer(x, cos, sin, bias, past=past, start=start, present=present)
        x = self.norm(x)
        if all_hidden is not None:
            all_hidden.append(x)
        new_cache = None if present is None else KVCache([k for k, _ in present], [v for _, v in present])
        return x, (tuple(all_hidden) if all_hidden is not None else None), new_cache


def _attention_bias(
    mask: Optional[Union[torch.Tensor, str]], bsz: int, length: int, dtype: torch.dtype
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(additive attention bias or None, the [B, L] bool real-token mask or None) for the accepted mask forms:
    None / ``"full"`` / all ones (no mask: SDPA may use its flash kernels), ``[B, L]`` (1 = real token; keys at
    padding are ignored) or the Hub sampler's ``[B, 1, L, L]`` bool. The bias uses the dtype's finite minimum, so a
    row with no key to attend (a padding query) gets finite values, not NaN."""
    if mask is None or isinstance(mask, str):
        if isinstance(mask, str) and mask != "full":
            raise ValueError(f"attention_mask must be a tensor, None or 'full', got {mask!r}.")
        return None, None
    if mask.dim() == 2:
        if mask.shape != (bsz, length):
            raise ValueError(f"attention_mask must be [B, L] = {(bsz, length)}, got {tuple(mask.shape)}.")
        real = mask.bool()
        if bool(real.all()):
            return None, None
        allowed = real[:, None, None, :]
    elif mask.dim() == 4:
        if mask.shape[0] != bsz or mask.shape[-2:] != (length, length):
            raise ValueError(f"A 4-d attention_mask must be [B, 1, L, L] = {(bsz, 1, length, length)}.")
        allowed, real = mask.bool(), None
    else:
        raise ValueError(f"attention_mask must be [B, L] or [B, 1, L, L], got shape {tuple(mask.shape)}.")
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return bias, real


@dataclass
class DreamOutput(MaskedLMOutput):
    """`MaskedLMOutput` plus ``cache``, the `KVCache` of a call with ``use_cache=True``."""

    cache: Optional[KVCache] = None


class DreamModel(DreamPreTrainedModel):
    """Dream with its LM head, loadable from the Hub checkpoints (``AutoModel``, the Hub's ``auto_map``, and
    ``AutoModelForMaskedLM``). The trunk is ``self.model`` (a `DreamBaseModel`), the head ``self.lm_head``."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}
    #: The output at position i predicts the token at i + 1 (see `DREAM_LOGITS_SHIFT`).
    logits_shift: ClassVar[int] = DREAM_LOGITS_SHIFT

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[Union[torch.Tensor, str]] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        logits_positions: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        num_logits_to_keep: int = 0,
        cache: Optional[KVCache] = None,
        use_cache: Optional[bool] = None,
        query_start: Optional[int] = None,
        **kwargs: Any,
    ) -> Union[DreamOutput, tuple]:
        """Bidirectional forward pass; the logits are **not** shifted (row i predicts token i + 1), as the Hub's.

        Args:
            input_ids: [B, L] token ids in [0, vocab_size) (or ``inputs_embeds`` [B, L, hidden]); on the CPU an id
                outside raises a ValueError that names it.
            attention_mask: [B, L], 1 for real tokens and 0 for padding (keys at padding are ignored and, unless
                ``position_ids`` are given, each row's real tokens take positions 0, 1, …); or the Hub sampler's
                [B, 1, L, L] bool with its ``position_ids``; None, ``"full"`` or all ones: no mask. With ``cache``
                it covers the whole sequence, [B, T] (a 4-d mask is refused).
            position_ids: optional [B, L] or [L] RoPE positions of the input (the Hub's third positional argument).
            logits_positions: optional bool [B, L]: the LM head runs only there and ``logits`` is [N, V] in the
                order of ``logits_positions.nonzero()`` (``full_logits[logits_positions]``), **unshifted** (the
                row for position i predicts token i + 1; `nara_diffusion.text.objectives.logits_at` applies the
                shift).
            output_hidden_states: also return the input of every layer and the final normalised hidden state.
            return_dict: return a `MaskedLMOutput` (default) or a tuple.
            num_logits_to_keep: the Hub's argument: > 0 keeps the logits of the last that many positions only.
            cache: a `KVCache` [B, …, T_c, …] from an earlier call with ``use_cache=True`` (inference only; Fast-dLLM's
                caches). ``input_ids`` [B, n] are then positions ``query_start … query_start+n-1`` of the sequence,
                and they attend to the cached K/V before ``query_start``, to their own fresh K/V and to the cached K/V
                after ``query_start + n``: the cache either ends at ``query_start`` (prefix cache) or covers the input
                (dual cache). ``logits_positions`` then covers the input [B, n]; the logits stay unshifted (row i of
                the input predicts token i + 1, so a caller that needs the prediction of position ``query_start``
                starts the input one position earlier). With fresh K/V (those a full forward of the same sequence
                computes) the result equals the full forward's at these positions up to float32 rounding; Dream
                attends both ways, so K/V cached before the other positions changed are an approximation.
            use_cache: also return ``cache``, the K/V of every position (cached ones included). Ignored while
                training with gradients (a trainer's ``use_cache=True`` changes nothing).
            query_start: first position of the input when ``cache`` is given; default: the cache's length.
            **kwargs: ``past_key_values`` is read as ``cache`` when it is a `KVCache` (other cache objects raise);
                ``labels`` and other trainer keywords are accepted and ignored (``labels`` with a warning: no loss is
                computed here); ``output_attentions`` raises.

        Returns:
            `DreamOutput` with ``logits`` [B, n, V] (or [N, V]), ``hidden_states`` and, with ``use_cache``, ``cache``.
        """
        past = kwargs.get("past_key_values")
        if past is not None:
            if cache is not None or not isinstance(past, KVCache):
                raise ValueError(
                    "Dream (nara_diffusion) takes its K/V cache as cache= (a KVCache from use_cache=True); "
                    f"past_key_values={type(past).__name__} is not supported."
                )
            cache = past
        if kwargs.get("output_attentions") not in (None, False):
            raise ValueError("Dream (nara_diffusion) does not support `output_attentions`.")
        if kwargs.get("labels") is not None:
            warnings.warn("DreamModel computes no loss: `labels` is ignored.", UserWarning, stacklevel=2)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else bool(self.config.output_hidden_states)
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = bool(use_cache) and not (self.training and torch.is_grad_enabled())
        hidden, all_hidden, new_cache = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, cache, use_cache, query_start
        )
        if logits_positions is not None:
            if logits_positions.dtype != torch.bool or logits_positions.shape != hidden.shape[:2]:
                raise ValueError(f"logits_positions must be a bool tensor of shape {tuple(hidden.shape[:2])}.")
            hidden = hidden[logits_positions]  # [N, hidden]
        elif num_logits_to_keep > 0:
            hidden = hidden[:, -num_logits_to_keep:]
        output = DreamOutput(logits=self.lm_head(hidden), hidden_states=all_hidden, cache=new_cache)
        return output if return_dict else output.to_tuple()


class DreamTokenizer(Qwen2Tokenizer):
    """The Hub's ``tokenization_dream.DreamTokenizer`` is Qwen2's byte-level BPE (``vocab.json`` + ``merges.txt``,
    EOS ``<|endoftext|>``); under this name ``AutoTokenizer`` loads a Dream folder without remote code, with its chat
    template and special tokens (``<|mask|>``) from ``tokenizer_config.json``."""


register_model_type(DreamConfig, DreamModel, DreamTokenizer)
