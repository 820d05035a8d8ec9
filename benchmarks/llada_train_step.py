"""Goal 1: one LLaDA SFT training step, NaRA vs peft LoRA (same rank and targets), and NaRA in the authors' mode.

A step is what the trainer does per update: ``sft_loss`` (per-example t, answer masking, forward with logits at the
masked positions only, LLaDA's ELBO; NaRA gets ``noise_level=t``, one λ per example), ``backward()`` and an AdamW
step (the recipe's betas 0.9/0.95, weight decay 0.05). Variants, all on the same frozen base weights:

* **peft LoRA**, batch B;
* **NaRA**, batch B, one λ per example;
* **NaRA, authors' mode**: the NaRA authors' code takes one λ for the whole batch, so they train with batch 1 (and 32
  accumulation steps). Here: B micro-steps of batch 1 (scalar λ, gradients accumulated), then one AdamW step: the
  same B examples, the same optimizer work per example as the batched step.

Reported: step times (median, IQR), per-round ratios, tokens/s, and memory: on CPU the bytes saved for backward,
the resident bytes (parameters, gradients, AdamW state) and the peak of live tensor bytes during a whole step
(a dispatch-mode tracker); on CUDA ``torch.cuda.max_memory_allocated`` over a step.

    python benchmarks/llada_train_step.py                    # CPU, reduced LLaDA (~2 min)
    python benchmarks/llada_train_step.py --full             # GPU: LLaDA-8B, bf16, batch 4 x 512
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import _llada as L
import _timing as T
import torch
from torch import nn

from nara_diffusion.text.objectives import sft_loss

GOAL_TIME, GOAL_MEM, GOAL_TOKENS = 1.03, 1.02, 3.0


@dataclass
class Variant:
    name: str
    model: nn.Module
    micro_batch: Optional[int] = None  # None: the whole batch in one forward; 1: the authors' mode
    opt: Optional[torch.optim.Optimizer] = None
    times: list[float] = field(default_factory=list)
    saved: int = 0
    resident: int = 0
    peak: int = 0
    start: int = 0  # bytes held when the step starts: weights, buffers, AdamW state


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    L.add_model_args(p)
    p.add_argument("--batch", type=int, default=None, help="batch size B (default: 8 reduced, 4 full)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 512, the recipes' max_length)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (the recipes' 0.05)")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing (the recipes turn it on)")
    p.add_argument("--no_authors", action="store_true", help="skip the authors' batch-1 mode")
    T.add_device_arg(p)
    T.add_timing_args(p, repeats=15, warmup=1, max_seconds=150.0)
    p.add_argument("--profile", action="store_true", help="also list the ops NaRA runs that LoRA does not")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up, batch 4 x 64")
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.full else 8)
    args.seq = args.seq or 512
    if args.quick:
        args.repeats, args.warmup, args.batch, args.seq = 3, 1, 4, 64
        args.max_seconds = min(args.max_seconds, 30.0)
    T.check_timing_args(p, args)
    return args


def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, list[Variant]]:
    config = L.llada_config(args)
    base = L.build_base(config, device, L.resolve_dtype(args, device), args.seed)
    spec = L.AdapterSpec(r=args.rank, dropout=args.dropout)
    lora = L.lora(L.shared_copy(base), spec)
    nara = L.nara(L.shared_copy(base), spec)
    variants = [Variant("peft LoRA", lora), Variant("NaRA (λ per example)", nara)]
    if not args.no_authors:
        variants.append(Variant("NaRA authors' mode (batch 1, scalar λ)", nara, micro_batch=1))
    for v in variants:
        v.model.train()
        if args.grad_ckpt:
            v.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the authors' mode shares the NaRA model but keeps its own AdamW state (same work per step)
    for v in variants:
        v.opt = torch.optim.AdamW(L.trainable(v.model), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    return config, variants


Inputs = tuple[torch.Tensor, torch.Tensor, int]


def step_fn(v: Variant, config: Any, device: torch.device) -> Callable[[Inputs], None]:
    """One update on ``(ids, prompt_lengths, seed)``: the masking is drawn from ``seed``, the same for every variant."""

    def run(inputs: Inputs) -> None:
        ids, prompts, seed = inputs
        gen = torch.Generator(device=device).manual_seed(seed)
        if v.micro_batch is None:
            sft_loss(v.model, ids, prompts, mask_token_id=config.mask_token_id, generator=gen).loss.backward()
        else:
            n = ids.shape[0]
            for i in range(0, n, v.micro_batch):
                part = slice(i, i + v.micro_batch)
                out = sft_loss(v.model, ids[part], prompts[part], mask_token_id=config.mask_token_id, generator=gen)
                (out.loss * (ids[part].shape[0] / n)).backward()
        v.opt.step()

    return run


def measure_memory(
    v: Variant, run: Callable[[Inputs], None], inputs: Inputs, config: Any, device: torch.device
) -> None:
    """Saved-for-backward, resident and peak bytes of one step (AdamW state exists: warm-up ran before)."""
    params = [*v.model.parameters(), *v.model.buffers()]
    v.opt.zero_grad(set_to_none=True)
    ids, prompts, seed = inputs
    if v.micro_batch is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        v.saved = T.saved_tensor_bytes(
            lambda: sft_loss(v.model, ids, prompts, mask_token_id=config.mask_token_id, generator=gen).loss, params
        )
    state = T.optimizer_state_tensors(v.opt)
    if device.type == "cuda":
        v.start = torch.cuda.memory_allocated(device)
        v.peak = T.cuda_peak_bytes(lambda: run(inputs), device)
    else:
        with T.PeakTensorBytes([*params, *state]) as tracker:
            run(inputs)
        v.start, v.peak = tracker.baseline, tracker.peak
    grads = [p.grad for p in v.model.parameters() if p.grad is not None]
    v.resident = T.tensor_bytes([*params, *grads, *T.optimizer_state_tensors(v.opt)])
    v.opt.zero_grad(set_to_none=True)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, malloc, t_start, load = T.start_run(args)
    config, variants = build(args, device)
    timer = T.make_timer(device)
    print(T.machine_line(device, malloc))
    print(
        f"{L.describe(config)}; {L.resolve_dtype(args, device)} base, fp32 adapters; rank {args.rank} on "
        f"{', '.join(L.TARGETS)}, dropout {args.dropout}; batch {args.batch} × seq {args.seq}"
        f"{'; activation checkpointing' if args.grad_ckpt else ''}; {args.repeats} rounds after {args.warmup} warm-up"
    )

    gen = torch.Generator().manual_seed(args.seed + 1)
    counter = iter(range(10**9))

    def make_input() -> Inputs:
        ids, prompts = L.sft_inputs(args.batch, args.seq, config, gen, device)
        return ids, prompts, args.seed * 1000 + next(counter)

    runs = [step_fn(v, config, device) for v in variants]

    def timed(v: Variant, run: Callable[[Inputs], None]) -> Callable[[Inputs], float]:
        def step(inputs: Inputs) -> float:
            v.opt.zero_grad(set_to_none=True)
            return timer(lambda: run(inputs))

        return step

    # warm-up steps also create the AdamW state, which the memory figures include
    first = make_input()
    for v, run in zip(variants, runs, strict=True):
        run(first)
        v.opt.zero_grad(set_to_none=True)
    for v, run in zip(variants, runs, strict=True):
        measure_memory(v, run, first, config, device)

    phase, rows = T.run_rounds([timed(v, r) for v, r in zip(variants, runs, strict=True)], make_input, args, "train")
    if phase.kept == 0:
        raise SystemExit("No clean round within --max_seconds: the machine is too busy.")
    for v, col in zip(variants, T.columns(rows), strict=True):
        v.times = col

    lora, nara = variants[0], variants[1]
    tokens = args.batch * args.seq
    mem_label = "peak (MiB)" if device.type == "cuda" else "peak live tensors (MiB)"
    table = []
    for v in variants:
        table.append(
            [
                v.name,
                T.fmt_ms(v.times),
                T.fmt_ratio(v.times, lora.times),
                f"{tokens / (T.median_ms(v.times) / 1e3):,.0f}",
                f"{v.saved / T.MB:.1f}" if v.saved else "–",
                f"{v.resident / T.MB:.1f}",
                f"{v.peak / T.MB:.1f}",
                f"{v.peak / lora.peak:.4f}",
                f"{L.param_count(v.model, only_trainable=True):,}",
            ]
        )
    header = [
        "variant",
        "step median (IQR) ms",
        "time / LoRA [IQR]",
        "tokens/s",
        "saved for bwd (MiB)",
        "params+grads+AdamW (MiB)",
        mem_label,
        "peak / LoRA",
        "trainable",
    ]
    print()
    print(T.markdown_table(header, table))
    print()
    for line in phase.summary("train step", args.stall_factor, args.repeats):
        print(line)
    print(load)
    print()
    r, lo, hi = T.ratio_stats(nara.times, lora.times)
    mem = nara.peak / lora.peak
    hyper = L.hypernet_params(nara.model)
    print(f"goal 1a  NaRA/LoRA step time: {r:.3f} [IQR {lo:.3f}–{hi:.3f}] (≤ {GOAL_TIME}: {T.verdict(r, GOAL_TIME)})")
    print(f"goal 1b  NaRA/LoRA peak memory: {mem:.4f} (≤ {GOAL_MEM}: {T.verdict(mem, GOAL_MEM)})")
    fixed = nara.start - lora.start
    print(
        f"         NaRA − LoRA at the peak: {(nara.peak - lora.peak) / T.MB:+.2f} MiB, of which "
        f"{fixed / T.MB:.2f} MiB is the hypernetwork's weights and AdamW moments ({hyper:,} parameters, the "
        f"same at any model size); the step's own memory (peak − what is held at its start) NaRA/LoRA: "
        f"{(nara.peak - nara.start) / (lora.peak - lora.start):.4f}"
    )
    if len(variants) > 2:
        authors = variants[2]
        g, glo, ghi = T.ratio_stats(authors.times, nara.times)
        print(
            f"goal 1c  tokens/s, batched NaRA (B={args.batch}) / authors' mode (B=1 × {args.batch}): {g:.2f}× "
            f"[IQR {glo:.2f}–{ghi:.2f}] (≥ {GOAL_TOKENS}: {'met' if g >= GOAL_TOKENS else 'NOT met'})"
        )

    if args.profile:
        pgen = torch.Generator().manual_seed(args.seed + 2)
        inputs = [(*L.sft_inputs(args.batch, args.seq, config, pgen, device), 7 + i) for i in range(args.profile_steps)]

        def prof_step(v: Variant, run: Callable[[Inputs], None]) -> Callable[[Inputs], None]:
            def go(x: Inputs) -> None:
                v.opt.zero_grad(set_to_none=True)
                run(x)

            return go

        a = T.profile_ops(prof_step(lora, runs[0]), inputs)
        b = T.profile_ops(prof_step(nara, runs[1]), inputs)
        diff = T.median_ms(nara.times) - T.median_ms(lora.times)
        print()
        print(f"NaRA-only ops per training step (torch.profiler; measured median difference {1e3 * diff:.0f} µs):")
        print()
        print(T.extra_ops_table(a, b))
    print(f"\n(total wall time {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
