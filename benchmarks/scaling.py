"""Goal 5: how a LLaDA training step's time grows with batch, sequence length and rank, NaRA vs peft LoRA.

One factor at a time around a centre (batch 4, sequence 256, r 32 at the reduced size): batch 1…8, sequence
64…512, and r = 8, 16, 32, 64, 128 (NaRA's hypernetwork ends in a 512 → r² layer, so it grows as r²: 0.18 M
parameters at r 8, 8.6 M at r 128). Each point is the same training step as ``llada_train_step.py`` (``sft_loss``,
backward, AdamW; NaRA with one λ per example), LoRA and NaRA on the same frozen weights, A/B alternating rounds.

    python benchmarks/scaling.py                        # CPU, reduced LLaDA (~1 min)
    python benchmarks/scaling.py --full --batches 1 4 16 --seqs 512 1024 2048   # GPU, LLaDA-8B
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Optional

import _llada as L
import _timing as T
import llada_train_step as TS
import torch

import nara_diffusion as nd


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    L.add_model_args(p)
    p.add_argument("--batch", type=int, default=4, help="centre batch size")
    p.add_argument("--seq", type=int, default=None, help="centre sequence length (default: 256 reduced, 1024 full)")
    p.add_argument("--rank", type=int, default=32, help="centre rank")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 8])
    p.add_argument("--seqs", type=int, nargs="*", default=None, help="default: 64 128 512 (reduced)")
    p.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 64, 128])
    p.add_argument("--dropout", type=float, default=0.05)
    T.add_device_arg(p)
    T.add_timing_args(p, repeats=5, warmup=1, max_seconds=30.0)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds per point, batches 1, seqs 64, ranks 8")
    args = p.parse_args(argv)
    args.seq = args.seq or (1024 if args.full else 256)
    args.seqs = args.seqs if args.seqs is not None else [64, 128, 512]
    if args.quick:
        args.repeats, args.warmup, args.batches, args.seqs, args.ranks = 2, 1, [1], [64], [8]
        args.seq = 128
    T.check_timing_args(p, args)
    return args


def points(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(varied factor, batch, seq, rank), the centre first."""
    pts = [("centre", args.batch, args.seq, args.rank)]
    pts += [("batch", b, args.seq, args.rank) for b in args.batches if b != args.batch]
    pts += [("seq", args.batch, s, args.rank) for s in args.seqs if s != args.seq]
    pts += [("rank", args.batch, args.seq, r) for r in args.ranks if r != args.rank]
    order = {"centre": 0, "batch": 1, "seq": 2, "rank": 3}
    return sorted(pts, key=lambda p: (order[p[0]], p[1], p[2], p[3]))


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, malloc, t_start, load = T.start_run(args)
    config = L.llada_config(args)
    base = L.build_base(config, device, L.resolve_dtype(args, device), args.seed)
    timer = T.make_timer(device)
    print(T.machine_line(device, malloc))
    print(
        f"{L.describe(config)}; {L.resolve_dtype(args, device)} base; targets {', '.join(L.TARGETS)}, dropout "
        f"{args.dropout}; training step = sft_loss + backward + AdamW; {args.repeats} rounds after {args.warmup} "
        "warm-up per point"
    )
    rows, disturbed = [], []
    gen = torch.Generator().manual_seed(args.seed + 1)
    counter = iter(range(10**9))
    if args.wait_idle > 0:
        T.wait_for_idle(args.wait_idle)
    point_args = argparse.Namespace(**{**vars(args), "wait_idle": 0.0})
    for factor, batch, seq, rank in points(args):
        spec = L.AdapterSpec(r=rank, dropout=args.dropout)
        variants = [
            TS.Variant("LoRA", L.lora(L.shared_copy(base), spec)),
            TS.Variant("NaRA", L.nara(L.shared_copy(base), spec)),
        ]
        for v in variants:
            v.model.train()
            v.opt = torch.optim.AdamW(L.trainable(v.model), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        runs = [TS.step_fn(v, config, device) for v in variants]

        def make_input(batch: int = batch, seq: int = seq) -> TS.Inputs:
            ids, prompts = L.sft_inputs(batch, seq, config, gen, device)
            return ids, prompts, next(counter)

        def timed(v: TS.Variant, run: Callable[[TS.Inputs], None]) -> Callable[[TS.Inputs], float]:
            def go(x: TS.Inputs) -> float:
                v.opt.zero_grad(set_to_none=True)
                return timer(lambda: run(x))

            return go

        phase, kept = T.run_rounds([timed(v, r) for v, r in zip(variants, runs, strict=True)], make_input, point_args)
        if phase.kept == 0:
            raise SystemExit("No clean round within --max_seconds: the machine is too busy.")
        lora_t, nara_t = T.columns(kept)
        hyper = sum(p.numel() for p in nd.get_adapter(variants[1].model).parameters())
        tokens = batch * seq
        rows.append(
            [
                factor,
                batch,
                seq,
                rank,
                f"{hyper / 1e6:.2f} M",
                T.fmt_ms(lora_t),
                T.fmt_ms(nara_t),
                f"{1e3 * (statistics.median(nara_t) - statistics.median(lora_t)):.1f}",
                f"**{T.fmt_ratio(nara_t, lora_t)}**",
                f"{tokens / statistics.median(lora_t):,.0f}",
            ]
        )
        if phase.summary("x", args.stall_factor, args.repeats)[1:]:
            disturbed.append(f"{factor} B={batch} L={seq} r={rank}")
        del variants, runs
    header = [
        "varied",
        "batch",
        "seq",
        "r",
        "hypernet",
        "LoRA step ms (IQR)",
        "NaRA step ms (IQR)",
        "NaRA − LoRA (ms)",
        "NaRA / LoRA [IQR]",
        "LoRA tokens/s",
    ]
    print()
    print(T.markdown_table(header, rows, "lrrrrrrrrr"))
    print()
    print(load)
    if disturbed:
        print(f"WARNING: points disturbed by other load (few clean rounds or busy CPUs): {', '.join(disturbed)}")
    print(f"\n(total wall time {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
