"""Adapter overhead: NaRA vs peft LoRA on a small random-weight Llama, on CPU (issue 3).

Measures, for the same base weights, rank and target modules:

* fwd+bwd time of one training step (cross-entropy against random labels), rounds in rotating order;
* forward-only time under ``torch.no_grad()`` (a sampling-like step);
* bytes saved for backward during one forward (a deterministic proxy for activation memory);
* trainable parameter counts.

Run ``python benchmarks/adapter_overhead.py --help`` for the options; ``--quick`` is a short smoke run and
``--profile`` adds a torch.profiler breakdown of where NaRA's extra time goes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import _timing as T
import peft
import torch
import transformers
from _timing import MB, Phase, median_ms, quartiles, ratio_stats
from torch import nn

import nara_diffusion as nd

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Variant:
    """One model under test and its timings (seconds, one entry per measured round)."""

    name: str
    model: nn.Module
    takes_noise: bool
    train_times: list[float] = field(default_factory=list)
    infer_times: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    trainable: int = 0


@dataclass
class Batch:
    """Inputs of one step: token ids, next-token labels and one noise level per example."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    lam: torch.Tensor


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="hidden size (intermediate = 688/256 of it)")
    p.add_argument("--layers", type=int, default=4, help="number of decoder layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads (= key/value heads)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    p.add_argument("--rank", type=int, default=16, help="adapter rank r (LoRA and NaRA)")
    p.add_argument("--batch", type=int, default=4, help="batch size B (NaRA gets B different noise levels)")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    T.add_timing_args(p, repeats=100, warmup=5, max_seconds=60.0)
    p.add_argument("--no_identity", action="store_true", help="skip the NaRA core='identity' variant")
    p.add_argument("--profile", action="store_true", help="also profile LoRA vs NaRA and list the top ops")
    p.add_argument("--profile_steps", type=int, default=20, help="steps per variant under the profiler")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 10 rounds, 2 warm-up, 5 profiled steps, 10 s per phase"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.profile_steps = 10, 2, 5
        args.max_seconds = min(args.max_seconds, 10.0)
    T.check_timing_args(p, args)
    return args


def build_variants(args: argparse.Namespace) -> list[Variant]:
    """A random Llama, then deep copies wrapped by peft LoRA, NaRA (noise core) and NaRA (identity core)."""
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 688 // 256,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq),
    )
    base = transformers.LlamaForCausalLM(config)
    lora_cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, lora_dropout=0.0)
    variants = [
        Variant("peft LoRA", peft.get_peft_model(copy.deepcopy(base), lora_cfg), takes_noise=False),
        Variant(
            "NaRA (core=noise)",
            nd.get_nara_model(
                copy.deepcopy(base), nd.NaRAConfig(r=args.rank, target_modules=TARGETS, lora_dropout=0.0)
            ),
            takes_noise=True,
        ),
    ]
    if not args.no_identity:
        id_cfg = nd.NaRAConfig(r=args.rank, target_modules=TARGETS, lora_dropout=0.0, core="identity")
        variants.append(Variant("NaRA (core=identity)", nd.get_nara_model(copy.deepcopy(base), id_cfg), True))
    for v in variants:
        v.model.train()
        v.trainable = sum(p.numel() for p in v.model.parameters() if p.requires_grad)
    return variants


def make_batch(args: argparse.Namespace, gen: torch.Generator) -> Batch:
    """Random tokens, random labels and λ ~ U[0, 1] of shape [B]."""
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    return Batch(ids, labels, torch.rand(args.batch, generator=gen))


def forward(v: Variant, batch: Batch) -> torch.Tensor:
    """Logits of one forward; NaRA variants get ``noise_level=λ`` (the identity core validates but does not use it)."""
    kwargs: dict[str, Any] = {"noise_level": batch.lam} if v.takes_noise else {}
    return v.model(input_ids=batch.input_ids, **kwargs).logits


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def train_step(v: Variant, batch: Batch) -> float:
    """One fwd+bwd; grads are cleared before the clock starts. Returns seconds."""
    v.model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss_of(forward(v, batch), batch.labels).backward()
    return time.perf_counter() - t0


def infer_step(v: Variant, batch: Batch) -> float:
    """One forward under no_grad. Returns seconds."""
    t0 = time.perf_counter()
    with torch.no_grad():
        forward(v, batch)
    return time.perf_counter() - t0


def run_rounds(
    variants: list[Variant], step: Callable[[Variant, Batch], float], sink: str, args: argparse.Namespace
) -> Phase:
    """Time ``step`` in rounds (`_timing.run_rounds`: rotating order, stalled rounds discarded, GC off), each on a
    fresh batch; the kept times go to ``variant.<sink>``."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    phase, rows = T.run_rounds(
        [functools.partial(step, v) for v in variants], lambda: make_batch(args, gen), args, sink
    )
    for i, v in enumerate(variants):
        getattr(v, sink).extend(row[i] for row in rows)
    return phase


def saved_for_backward_bytes(v: Variant, batch: Batch) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward + loss.

    Storages of parameters and buffers (e.g. frozen weights saved by ``linear``) are excluded: they are resident
    anyway. Storages are counted once however many ops save them.
    """
    v.model.zero_grad(set_to_none=True)
    return T.saved_tensor_bytes(
        lambda: loss_of(forward(v, batch), batch.labels), [*v.model.parameters(), *v.model.buffers()]
    )


def report(variants: list[Variant]) -> str:
    """The markdown table of results (clean rounds only; ratios are to the first variant, peft LoRA)."""
    ref = variants[0]
    rows = [
        "| variant | fwd+bwd median (ms) | fwd+bwd IQR (ms) | fwd+bwd min–max (ms) | fwd+bwd ratio to LoRA "
        "[IQR] | fwd-only median (ms) | fwd-only ratio to LoRA [IQR] | saved-for-backward (MB) | saved ratio "
        "| trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        q1, q3 = quartiles(v.train_times)
        r, rlo, rhi = ratio_stats(v.train_times, ref.train_times)
        f, flo, fhi = ratio_stats(v.infer_times, ref.infer_times)
        rows.append(
            f"| {v.name} | {median_ms(v.train_times):.2f} | {1e3 * q1:.2f}–{1e3 * q3:.2f} "
            f"| {1e3 * min(v.train_times):.2f}–{1e3 * max(v.train_times):.2f} "
            f"| {r:.3f} [{rlo:.3f}–{rhi:.3f}] | {median_ms(v.infer_times):.2f} | {f:.3f} [{flo:.3f}–{fhi:.3f}] "
            f"| {v.saved_bytes / MB:.2f} | {v.saved_bytes / ref.saved_bytes:.3f} | {v.trainable:,} |"
        )
    return "\n".join(rows)


def extra_ops_report(
    lora: Variant, nara: Variant, step: Callable[[Variant, Batch], float], args: argparse.Namespace, top: int = 20
) -> str:
    """The ops NaRA runs that LoRA does not (same op and input shapes, more calls per step), from
    ``--profile_steps`` profiled steps of each (`_timing.extra_ops_table`)."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    batches = [make_batch(args, gen) for _ in range(args.profile_steps)]
    a = T.profile_ops(functools.partial(step, lora), batches)
    b = T.profile_ops(functools.partial(step, nara), batches)
    return T.extra_ops_table(a, b, top, total_label="total NaRA-only op time")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    variants = build_variants(args)
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"Llama: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, vocab {args.vocab}; "
        f"rank {args.rank} on {', '.join(TARGETS)}; batch {args.batch} × seq {args.seq}; float32; "
        f"{args.repeats} rounds after {args.warmup} warm-up"
    )

    batch = make_batch(args, torch.Generator().manual_seed(args.seed + 3))
    for v in variants:
        v.saved_bytes = saved_for_backward_bytes(v, batch)

    phases = [
        run_rounds(variants, train_step, "train_times", args),
        run_rounds(variants, infer_step, "infer_times", args),
    ]
    if any(ph.kept == 0 for ph in phases):
        raise SystemExit("No clean round within --max_seconds: the machine is too busy (try --threads 1).")

    lora, nara = variants[0], variants[1]
    r, _, _ = ratio_stats(nara.train_times, lora.train_times)
    f, _, _ = ratio_stats(nara.infer_times, lora.infer_times)
    print()
    print(report(variants))
    print()
    for ph, label in zip(phases, ("fwd+bwd", "forward-only"), strict=True):
        for line in ph.summary(label, args.stall_factor, args.repeats):
            print(line)
    print(f"load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}")
    print()
    print(f"NaRA/LoRA fwd+bwd median per-round ratio: {r:.3f} (goal ≤ 1.05: {'met' if r <= 1.05 else 'NOT met'})")
    print(f"NaRA/LoRA forward-only (no_grad) median per-round ratio: {f:.3f}")

    if args.profile:
        for label, step, times in (
            ("fwd+bwd", train_step, "train_times"),
            ("forward-only", infer_step, "infer_times"),
        ):
            diff = median_ms(getattr(nara, times)) - median_ms(getattr(lora, times))
            print()
            print(
                f"NaRA-only ops, {label} (torch.profiler, {args.profile_steps} steps; profiler overhead included; "
                f"measured median difference NaRA − LoRA: {1e3 * diff:.0f} µs/step):"
            )
            print()
            print(extra_ops_report(lora, nara, step, args))
    print(f"\n(total wall time {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
