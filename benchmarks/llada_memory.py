"""Goal 3: training memory of LLaDA-8B with NaRA r=32 on q/k/v/attn_out, and what the masked-only LM head saves.

On a GPU (``--device cuda``) it builds LLaDA-8B in bf16 (meta init, then materialised; one copy of the weights shared
by the adapters) and measures ``torch.cuda.max_memory_allocated`` over whole training steps (``sft_loss`` forward,
backward, AdamW):

* NaRA vs peft LoRA at 4 × 1024 tokens;
* NaRA with logits at the masked positions only (``logits_positions``, the default) vs full-vocabulary logits, at
  4 × 1024 and 1 × 4096;
* NaRA with activation checkpointing at 16 × 1024 (goal: under 40 GiB).

On CPU it computes what can be computed without the GPU, for the 8B architecture:

* parameter counts (model built on the meta device) and resident bytes (bf16 base, fp32 adapter weights,
  gradients and AdamW moments);
* full-vocabulary logits bytes at 4 × 1024 and 1 × 4096 in bf16 and fp32, and the masked positions' share;
* bytes of the loss path per logit element, measured: a LLaDA with the real 126,464-token vocabulary and a tiny
  trunk runs ``sft_loss`` + backward under a live-tensor tracker, with and without ``logits_positions``;
* bytes saved for backward per token by one 8B-width block (bf16, measured on CPU at 64 tokens; every saved
  tensor is linear in the token count), base / LoRA / NaRA;
* from these, an estimate of the peak of a training step (resident + activations + loss path). It ignores allocator
  fragmentation, kernel workspaces and backward temporaries: the measured figure needs the GPU command.

    python benchmarks/llada_memory.py                  # CPU: counts, logits bytes, per-token activations, estimates
    python benchmarks/llada_memory.py --device cuda    # GPU: the measured peaks (needs ~45 GiB free)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from typing import Optional

import _llada as L
import _timing as T
import torch
from torch import nn

import nara_diffusion as nd
from nara_diffusion.text.llada import LLaDABlock, LLaDAConfig, LLaDAModelLM, rotary_cos_sin
from nara_diffusion.text.objectives import sft_loss

GIB = T.GiB
SHAPES = {"4 × 1024": (4, 1024), "1 × 4096": (1, 4096)}
MASK_FRACTION = 0.5  # E[t] for t ~ U(0, 1), with the whole sequence as answer region (the most logits)
MASK_FRACTIONS = (0.25, 0.5, 0.75)
LOSS_SEQS = (2048, 4096)
Fit = tuple[float, float]  # bytes per [B·L, V] logit element, fixed bytes


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_device_arg(p)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


# -- counts --------------------------------------------------------------------------------------------------------
def parameter_counts(config: LLaDAConfig, spec: L.AdapterSpec) -> dict[str, int]:
    """Parameters of LLaDA-8B and of the two adapters, counted on the meta device."""
    with torch.device("meta"):
        base = LLaDAModelLM(config)
    total = L.param_count(base)
    emb = config.embedding_size * config.d_model
    counts = {"base": total, "embedding": emb, "lm head": 0 if config.weight_tying else emb}
    counts["blocks"] = total - counts["embedding"] - counts["lm head"] - config.d_model
    lora = L.lora(L.shared_copy(base), spec)
    counts["LoRA A+B"] = L.param_count(lora, only_trainable=True)
    nara = L.nara(L.shared_copy(base), spec)
    counts["NaRA hypernetwork"] = L.hypernet_params(nara)
    counts["NaRA A+B"] = L.param_count(nara, only_trainable=True) - counts["NaRA hypernetwork"]
    return counts


def resident_bytes(counts: dict[str, int], trainable: int) -> int:
    """bf16 base + fp32 trainable weights, gradients and two AdamW moments (16 B per trainable parameter)."""
    return 2 * counts["base"] + 16 * trainable


# -- measured on CPU -----------------------------------------------------------------------------------------------
def loss_path_bytes(config: LLaDAConfig, spec: L.AdapterSpec, seed: int) -> dict[tuple[float, bool], Fit]:
    """Peak bytes of the head + loss (forward and backward) as ``slope · B·L·V + intercept``, measured.

    A LLaDA with the real vocabulary and a 64-wide trunk (whose own memory is negligible) runs ``sft_loss`` +
    backward under a live-tensor tracker, the whole sequence being answer and t fixed, so that exactly a fraction t
    of the positions is masked; with and without ``logits_positions``. Two lengths (2048 and 4096 tokens) give the
    slope per logit element and the intercept (the cross-entropy's float32 chunks, a fixed size).

    Returns ``{(mask fraction, logits_positions): (bytes per [B·L, V] element, fixed bytes)}``.
    """
    tiny = LLaDAConfig(
        d_model=64, n_layers=1, n_heads=1, n_kv_heads=1, mlp_hidden_size=64, vocab_size=config.vocab_size,
        embedding_size=config.embedding_size, mask_token_id=config.mask_token_id, eos_token_id=config.eos_token_id,
        max_sequence_length=8192,
    )  # fmt: skip
    base = L.build_base(tiny, torch.device("cpu"), torch.bfloat16, seed)
    model = L.nara(base, L.AdapterSpec(r=8, dropout=spec.dropout)).train()
    v = config.embedding_size
    out: dict[tuple[float, bool], Fit] = {}
    for fraction in MASK_FRACTIONS:
        for positions in (False, True):
            peaks = []
            for seq in LOSS_SEQS:
                ids = torch.randint(0, config.mask_token_id, (1, seq), generator=torch.Generator().manual_seed(seed))
                prompts = torch.zeros(1, dtype=torch.long)
                with T.PeakTensorBytes([*model.parameters(), *model.buffers()]) as tracker:
                    res = sft_loss(
                        model, ids, prompts, mask_token_id=tiny.mask_token_id, t=fraction, logits_positions=positions
                    )
                    res.loss.backward()
                assert int(res.batch.masked.sum()) == round(fraction * seq)
                model.zero_grad(set_to_none=True)
                peaks.append(tracker.peak - tracker.baseline)
            slope = (peaks[1] - peaks[0]) / ((LOSS_SEQS[1] - LOSS_SEQS[0]) * v)
            out[(fraction, positions)] = (slope, peaks[0] - slope * LOSS_SEQS[0] * v)
    return out


def block_bytes_per_token(config: LLaDAConfig, spec: L.AdapterSpec) -> dict[str, float]:
    """Bytes saved for backward per token by one 8B-width block (bf16 base; fp32 adapters), measured at 64 tokens."""
    out: dict[str, float] = {}
    tokens = 64
    cos, sin = rotary_cos_sin(tokens, config.d_model // config.n_heads, config.rope_theta, torch.device("cpu"))
    for kind in ("base", "LoRA", "NaRA"):
        with torch.device("meta"):
            block = LLaDABlock(config, 0)
        block = block.to(torch.bfloat16).to_empty(device="cpu")
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, 0.02)
        block.requires_grad_(False)
        if kind == "LoRA":
            import peft

            cfg = peft.LoraConfig(r=spec.r, lora_alpha=spec.r, lora_dropout=spec.dropout, target_modules=L.TARGETS)
            peft.inject_adapter_in_model(cfg, block)
        elif kind == "NaRA":
            nd.inject_nara(block, nd.NaRAConfig(r=spec.r, lora_dropout=spec.dropout, target_modules=L.TARGETS))
        for name, p in block.named_parameters():  # peft would cast adapters to fp32 under autocast_adapter_dtype
            if "lora_" in name or "nara_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        block.train()
        x = torch.randn(1, tokens, config.d_model, dtype=torch.bfloat16, requires_grad=kind == "base")

        def run(block: nn.Module = block, x: torch.Tensor = x, noise: bool = kind == "NaRA") -> torch.Tensor:
            with nd.noise_level(block, 0.5) if noise else contextlib.nullcontext():
                return block(x, cos, sin)

        out[kind] = T.saved_tensor_bytes(run, [*block.parameters(), *block.buffers()]) / tokens
    return out


def estimates(
    config: LLaDAConfig, counts: dict[str, int], per_token: dict[str, float], loss: dict[tuple[float, bool], Fit]
) -> list[list[str]]:
    """Estimated peak of a training step: resident + 32 blocks' activations + the loss path."""
    d, v, layers = config.d_model, config.embedding_size, config.n_layers
    rows = []
    for label, batch, seq, kind, ckpt in (
        ("LoRA, 4 × 1024", 4, 1024, "LoRA", False),
        ("NaRA, 4 × 1024", 4, 1024, "NaRA", False),
        ("NaRA, 16 × 1024, activation checkpointing", 16, 1024, "NaRA", True),
    ):
        tokens = batch * seq
        trainable = counts["LoRA A+B"] if kind == "LoRA" else counts["NaRA A+B"] + counts["NaRA hypernetwork"]
        res = resident_bytes(counts, trainable)
        if ckpt:  # block inputs kept, one block recomputed at a time
            acts = layers * tokens * d * 2 + per_token[kind] * tokens
        else:
            acts = layers * per_token[kind] * tokens
        slope, fixed = loss[(MASK_FRACTION, True)]
        head = slope * tokens * v + fixed
        rows.append([label, gib(res), gib(acts), gib(head), f"**{gib(res + acts + head)}**"])
    return rows


# -- measured on GPU -----------------------------------------------------------------------------------------------
def gpu_measurements(args: argparse.Namespace, config: LLaDAConfig, spec: L.AdapterSpec) -> None:
    device = torch.device(args.device)
    base = L.build_base(config, device, torch.bfloat16, args.seed)
    lora = L.lora(L.shared_copy(base), spec).train()
    nara = L.nara(L.shared_copy(base), spec).train()
    ckpt = L.nara(L.shared_copy(base), spec).train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(args.seed)

    def peak(model: nn.Module, batch: int, seq: int, positions: bool = True) -> int:
        opt = torch.optim.AdamW(L.trainable(model), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        ids, prompts = L.sft_inputs(batch, seq, config, gen, device)
        prompts.zero_()  # the whole sequence is answer: the most masked positions at a given t

        def step() -> None:
            g = torch.Generator(device=device).manual_seed(1)
            out = sft_loss(
                model, ids, prompts, mask_token_id=config.mask_token_id, generator=g, t=MASK_FRACTION,
                logits_positions=positions,
            )  # fmt: skip
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # AdamW state exists from here on
        result = T.cuda_peak_bytes(step, device)
        torch.cuda.empty_cache()
        return result

    rows = []
    p_lora, p_nara = peak(lora, 4, 1024), peak(nara, 4, 1024)
    rows.append(["LoRA, 4 × 1024", gib(p_lora), ""])
    rows.append(["NaRA, 4 × 1024", gib(p_nara), f"NaRA / LoRA {p_nara / p_lora:.4f} (goal: within LoRA's memory)"])
    for label, (b, s) in SHAPES.items():
        full, masked = peak(nara, b, s, positions=False), peak(nara, b, s, positions=True)
        rows.append([f"NaRA, {label}, full-vocabulary logits", gib(full), ""])
        rows.append([f"NaRA, {label}, masked positions only", gib(masked), f"saves {gib(full - masked)} GiB"])
    p_ckpt = peak(ckpt, 16, 1024)
    rows.append(["NaRA, 16 × 1024, activation checkpointing", gib(p_ckpt), f"goal < 40 GiB: {p_ckpt < 40 * GIB}"])
    print()
    print(
        f"Measured on {torch.cuda.get_device_name(device)} (max_memory_allocated over one step, t = {MASK_FRACTION}; "
        "the three adapter sets on the shared weights are resident in every row):"
    )
    print()
    print(T.markdown_table(["run", "peak (GiB)", "note"], rows, "lrl"))


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    config = LLaDAConfig()  # LLaDA-8B
    spec = L.AdapterSpec(r=args.rank, dropout=args.dropout)
    print(T.machine_line(device))
    print(f"{L.describe(config)}; adapters r={args.rank} on {', '.join(L.TARGETS)}, dropout {args.dropout}")

    counts = parameter_counts(config, spec)
    print()
    print("Parameters (meta device) and resident training bytes (bf16 base; fp32 adapter weights, grads, AdamW):")
    print()
    lora_t, nara_t = counts["LoRA A+B"], counts["NaRA A+B"] + counts["NaRA hypernetwork"]
    rows = [[k, f"{v:,}"] for k, v in counts.items()]
    rows.append(["resident, LoRA (GiB)", gib(resident_bytes(counts, lora_t))])
    rows.append(["resident, NaRA (GiB)", gib(resident_bytes(counts, nara_t))])
    print(T.markdown_table(["", "value"], rows))

    v = config.embedding_size
    print()
    print(f"Full-vocabulary logits [B, L, {v:,}] and the masked positions only (mask fraction {MASK_FRACTION}):")
    print()
    rows = []
    for label, (b, s) in SHAPES.items():
        full = b * s * v
        rows.append([label, gib(2 * full), gib(4 * full), gib(2 * full * MASK_FRACTION), gib(4 * full * MASK_FRACTION)])
    print(
        T.markdown_table(
            ["tokens", "full bf16 (GiB)", "full fp32 (GiB)", "masked bf16 (GiB)", "masked fp32 (GiB)"], rows
        )
    )

    loss = loss_path_bytes(config, spec, args.seed)
    print()
    print(
        "Head + loss, measured: peak live bytes of forward + backward, per element of the full [B·L, V] logits plus "
        f"a fixed part (bf16 head, real vocabulary, CPU, fitted at {LOSS_SEQS} tokens), and at 8B shapes:"
    )
    print()
    rows = []
    for fraction in MASK_FRACTIONS:
        (full, full_c), (masked, masked_c) = loss[(fraction, False)], loss[(fraction, True)]
        cells = [f"{fraction:g}", f"{full:.2f} + {full_c / T.MB:.0f} MiB", f"{masked:.2f} + {masked_c / T.MB:.0f} MiB"]
        for b, s in SHAPES.values():
            f, m = full * b * s * v + full_c, masked * b * s * v + masked_c
            cells.append(f"{gib(f)} → {gib(m)}: **{gib(f - m)}**")
        rows.append(cells)
    header = ["mask fraction", "full-vocab (B/elt + fixed)", "masked-only (B/elt + fixed)"]
    header += [f"{label}: full → masked, saved (GiB)" for label in SHAPES]
    print(T.markdown_table(header, rows))

    per_token = block_bytes_per_token(config, spec)
    print()
    print("Saved for backward per token by one 8B-width block (bf16, measured at 64 tokens on CPU):")
    print()
    rows = [[k, f"{b / 1024:.1f}", f"{b / per_token['LoRA']:.4f}"] for k, b in per_token.items()]
    print(T.markdown_table(["block", "KiB / token", "/ LoRA"], rows))
    print()
    print("Estimated peak of one training step (resident + activations of 32 blocks + loss path; no fragmentation,")
    print("workspaces or backward temporaries; the GPU run below measures it):")
    print()
    print(
        T.markdown_table(
            ["run", "resident (GiB)", "activations (GiB)", "loss path (GiB)", "estimate (GiB)"],
            estimates(config, counts, per_token, loss),
        )
    )
    if device.type == "cuda":
        gpu_measurements(args, config, spec)
    else:
        print()
        print("Measured peaks need a GPU: python benchmarks/llada_memory.py --device cuda")
    print(f"\n(total wall time {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
