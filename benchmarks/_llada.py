"""LLaDA models for the benchmarks: the real architecture at full (8B) or reduced size, random weights.

The model is built on the meta device (no memory, no init cost), then materialised on the target device and filled
with LLaDA's init (normal(0, 0.02) weights, unit norm weights). Adapted variants share the frozen base weights: each
variant wraps a copy of the module tree whose parameters are the base's own tensors, so a GPU holds the 8B weights
once however many variants run.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Optional

import peft
import torch
from torch import nn

import nara_diffusion as nd
from nara_diffusion.text.llada import LLaDAConfig, LLaDAModelLM

TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out"]
FULL = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "mlp": 12288, "vocab": 126464}
# Reduced CPU default: 1/8 of the width, 1/8 of the depth, the same head size (128) and MLP ratio (3); the vocabulary
# keeps the 8B model's share of LM-head compute per masked token (~7% of a forward's FLOPs).
REDUCED = {"d_model": 512, "n_layers": 4, "n_heads": 4, "mlp": 1536, "vocab": 2048}


def add_model_args(p: argparse.ArgumentParser, full_default: bool = False) -> None:
    """``--full`` (LLaDA-8B) or the reduced sizes, each overridable."""
    p.add_argument("--full", action="store_true", default=full_default, help="LLaDA-8B sizes (use on a GPU)")
    p.add_argument("--d_model", type=int, default=None, help=f"width (reduced {REDUCED['d_model']}, full 4096)")
    p.add_argument("--layers", type=int, default=None, help=f"blocks (reduced {REDUCED['n_layers']}, full 32)")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads (reduced {REDUCED['n_heads']}, full 32)")
    p.add_argument("--mlp", type=int, default=None, help=f"MLP width (reduced {REDUCED['mlp']}, full 12288)")
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary (reduced {REDUCED['vocab']}, full 126464)")
    p.add_argument("--dtype", default=None, help="base weights: float32 or bfloat16 (default: fp32 CPU, bf16 GPU)")


def llada_config(args: argparse.Namespace) -> LLaDAConfig:
    """The 8B config (``--full``) or the reduced one, with any size given on the command line."""
    sizes = dict(FULL if args.full else REDUCED)
    for key, arg in (("d_model", "d_model"), ("n_layers", "layers"), ("n_heads", "heads"), ("mlp", "mlp")):
        if getattr(args, arg) is not None:
            sizes[key] = getattr(args, arg)
    if args.vocab is not None:
        sizes["vocab"] = args.vocab
    vocab = sizes["vocab"]
    special = {}  # the 8B ids when the vocabulary is the real one, else the top of the reduced vocabulary
    if vocab < FULL["vocab"]:
        special = {"mask_token_id": vocab - 1, "eos_token_id": vocab - 2, "pad_token_id": vocab - 2}
    return LLaDAConfig(
        d_model=sizes["d_model"],
        n_layers=sizes["n_layers"],
        n_heads=sizes["n_heads"],
        n_kv_heads=sizes["n_heads"],
        mlp_hidden_size=sizes["mlp"],
        vocab_size=vocab,
        embedding_size=vocab,
        **special,
    )


def resolve_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def describe(config: LLaDAConfig) -> str:
    return (
        f"LLaDA d_model {config.d_model}, {config.n_layers} blocks, {config.n_heads} heads, "
        f"MLP {config.intermediate_size}, "
        f"vocab {config.vocab_size}"
    )


def build_base(config: LLaDAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LLaDAModelLM:
    """The model built on the meta device, materialised on ``device`` in ``dtype`` with LLaDA's random init."""
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.init_std, generator=gen)
    return model.eval()


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are ``model``'s own tensors (no weight memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


@dataclass
class AdapterSpec:
    r: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = tuple(TARGETS)


def lora(base: nn.Module, spec: AdapterSpec) -> peft.PeftModel:
    """peft LoRA with s = lora_alpha / r = 1 (the NaRA authors' convention), random B so it is not a no-op."""
    cfg = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.r,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        init_lora_weights=False,
    )
    return peft.get_peft_model(base, cfg)


def nara(base: nn.Module, spec: AdapterSpec, core: str = "noise") -> peft.PeftModel:
    """NaRA with the authors' settings (η 0.1, s 1, Fourier embedding, MLP 64→256→512→r²); B and the hypernetwork's
    last layer random, so every product is a real one."""
    cfg = nd.NaRAConfig(
        r=spec.r, lora_dropout=spec.dropout, target_modules=list(spec.targets), core=core, init_weights=False
    )
    model = nd.get_nara_model(base, cfg)
    if core == "noise":
        last = nd.get_adapter(model).generator.layers[-1]
        with torch.no_grad():
            last.weight.normal_(0.0, 1e-2)
    return model


def merged_lora(base: nn.Module, spec: AdapterSpec) -> nn.Module:
    """LoRA merged into an independent copy of the base weights: what merged LoRA costs at inference (the base)."""
    return lora(copy.deepcopy(base), spec).merge_and_unload()


def trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sft_inputs(
    batch: int, seq: int, config: LLaDAConfig, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random SFT examples: token ids (never the mask token) and prompt lengths in [seq/8, seq/2)."""
    high = min(config.vocab_size, config.mask_token_id or config.vocab_size)
    ids = torch.randint(0, high, (batch, seq), generator=gen)
    prompts = torch.randint(max(1, seq // 8), max(2, seq // 2), (batch,), generator=gen)
    return ids.to(device), prompts.to(device)


def param_count(model: nn.Module, only_trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not only_trainable)


def hypernet_params(model: nn.Module) -> int:
    try:
        return sum(p.numel() for p in nd.get_adapter(model).parameters())
    except TypeError:
        return 0


def first_param(model: nn.Module) -> Optional[torch.Tensor]:
    return next(iter(model.parameters()), None)
