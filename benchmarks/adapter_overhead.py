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
import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import peft
import torch
import transformers
from torch import nn

import nara_diffusion as nd

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MB = 1024 * 1024


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
    p.add_argument("--repeats", type=int, default=100, help="measured rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured warm-up rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stall-factor",
        type=float,
        default=1.5,
        help="discard a round when some variant took more than this × its fastest round (host contention)",
    )
    p.add_argument("--max-seconds", type=float, default=60.0, help="time budget of each timing phase")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each timing phase, wait up to this many seconds for other processes to leave the CPUs idle",
    )
    p.add_argument("--no-identity", action="store_true", help="skip the NaRA core='identity' variant")
    p.add_argument("--profile", action="store_true", help="also profile LoRA vs NaRA and list the top ops")
    p.add_argument("--profile-steps", type=int, default=20, help="steps per variant under the profiler")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 10 rounds, 2 warm-up, 5 profiled steps, 10 s per phase"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.profile_steps = 10, 2, 5
        args.max_seconds = min(args.max_seconds, 10.0)
    if args.repeats < 1 or args.warmup < 0 or args.stall_factor <= 1.0:
        p.error("--repeats must be >= 1, --warmup >= 0 and --stall-factor > 1")
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


@dataclass
class Phase:
    """Bookkeeping of one timing phase: measured rounds kept and discarded."""

    name: str
    kept: int = 0
    discarded: int = 0
    out_of_time: bool = False
    foreign_cpu: Optional[float] = None  # share of all CPUs used by other processes while timing


def cpu_busy_seconds() -> Optional[float]:
    """Busy CPU seconds of the whole machine since boot, from /proc/stat (None where unavailable)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def wait_for_idle(max_wait: float, window: float = 2.0, threshold: float = 0.05) -> None:
    """Sleep until other processes use under ``threshold`` of the CPUs over ``window`` s, at most ``max_wait`` s."""
    end = time.perf_counter() + max_wait
    while time.perf_counter() < end:
        b0 = cpu_busy_seconds()
        time.sleep(window)
        b1 = cpu_busy_seconds()
        if b0 is None or b1 is None or (b1 - b0) / (window * (os.cpu_count() or 1)) < threshold:
            return
    print(f"(CPUs still busy after waiting {max_wait:.0f} s; timing anyway)", file=sys.stderr)


def clean_rows(rows: list[list[float]], factor: float) -> list[list[float]]:
    """Rounds in which every variant took at most ``factor`` × its fastest time over all rounds."""
    fastest = [min(col) for col in zip(*rows, strict=True)]
    return [row for row in rows if all(t <= factor * f for t, f in zip(row, fastest, strict=True))]


def run_rounds(
    variants: list[Variant], step: Callable[[Variant, Batch], float], sink: str, args: argparse.Namespace
) -> Phase:
    """Time ``step`` in rounds; each round runs every variant once on the same batch.

    The order rotates (A B C, B C A, C A B, ...) so that every variant takes every position equally often and
    never follows itself. Rounds where another process stole the CPU (some variant slower than
    ``--stall-factor`` × its fastest round) are discarded, and rounds continue until ``--repeats`` clean ones
    are in or ``--max-seconds`` have passed. GC is off while timing.
    """
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows: list[list[float]] = []
    kept: list[list[float]] = []
    deadline = time.perf_counter() + args.max_seconds
    phase = Phase(sink)
    gc.collect()
    busy0, own0, wall0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    gc.disable()
    try:
        rnd = 0
        while True:
            batch = make_batch(args, gen)
            k = rnd % len(variants)
            row = [0.0] * len(variants)
            for i in [*range(k, len(variants)), *range(k)]:
                row[i] = step(variants[i], batch)
            if rnd >= args.warmup:
                rows.append(row)
                kept = clean_rows(rows, args.stall_factor)
                if len(kept) >= args.repeats:
                    break
            rnd += 1
            if time.perf_counter() > deadline:
                phase.out_of_time = True
                break
    finally:
        gc.enable()
    busy1, own1, wall1 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    if busy0 is not None and busy1 is not None:
        foreign = (busy1 - busy0) - (own1 - own0)
        phase.foreign_cpu = max(0.0, foreign) / ((wall1 - wall0) * (os.cpu_count() or 1))
    kept = kept[: args.repeats]
    for i, v in enumerate(variants):
        getattr(v, sink).extend(row[i] for row in kept)
    phase.kept, phase.discarded = len(kept), len(rows) - len(kept)
    return phase


def saved_for_backward_bytes(v: Variant, batch: Batch) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward + loss.

    Storages of parameters and buffers (e.g. frozen weights saved by ``linear``) are excluded: they are resident
    anyway. Storages are counted once however many ops save them.
    """
    resident = {t.untyped_storage().data_ptr() for t in [*v.model.parameters(), *v.model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in resident:
            seen[ptr] = storage.nbytes()
        return t

    v.model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(forward(v, batch), batch.labels)
    total = sum(seen.values())  # the graph (and so every saved storage) is alive here: no address reuse
    del loss
    return total


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and IQR of the per-round ratios num[i] / den[i]."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    lo, hi = quartiles(ratios)
    return statistics.median(ratios), lo, hi


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


OpKey = tuple[str, str]  # (op name, input shapes)


def profile_ops(
    v: Variant, step: Callable[[Variant, Batch], float], args: argparse.Namespace
) -> dict[OpKey, tuple[float, float]]:
    """Self CPU µs per step and calls per step of each (op, input shapes) over ``--profile-steps`` steps."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    batches = [make_batch(args, gen) for _ in range(args.profile_steps)]
    for batch in batches[:2]:
        step(v, batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in batches:
            step(v, batch)
    n = len(batches)
    return {
        (e.key, str(e.input_shapes)): (e.self_cpu_time_total / n, e.count / n)
        for e in prof.key_averages(group_by_input_shape=True)
    }


def extra_ops_report(
    lora: Variant, nara: Variant, step: Callable[[Variant, Batch], float], args: argparse.Namespace, top: int = 20
) -> str:
    """The ops NaRA runs that LoRA does not (same op and input shapes, more calls per step).

    Ops both models run equally often are the shared base model; their time differences between two profiler
    sessions are noise, so only the extra calls are attributed to NaRA (at NaRA's mean time per call).
    """
    a, b = profile_ops(lora, step, args), profile_ops(nara, step, args)
    extra: list[tuple[float, float, OpKey]] = []
    for key, (t_b, c_b) in b.items():
        c_a = a.get(key, (0.0, 0.0))[1]
        if c_b > c_a + 1e-9:
            extra.append((t_b * (c_b - c_a) / c_b, c_b - c_a, key))
    extra.sort(reverse=True)
    total = sum(t for t, _, _ in extra)
    lines = [
        "| op | input shapes | extra calls/step | extra µs/step |",
        "|---|---|---:|---:|",
    ]
    for t, c, (name, shapes) in extra[:top]:
        short = shapes if len(shapes) <= 60 else shapes[:57] + "..."
        lines.append(f"| `{name}` | `{short}` | {c:g} | {t:.0f} |")
    rest = extra[top:]
    if rest:
        lines.append(f"| ({len(rest)} more) | | {sum(c for _, c, _ in rest):g} | {sum(t for t, _, _ in rest):.0f} |")
    lines.append(f"| **total NaRA-only op time** | | {sum(c for _, c, _ in extra):g} | **{total:.0f}** |")
    return "\n".join(lines)


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
        raise SystemExit("No clean round within --max-seconds: the machine is too busy (try --threads 1).")

    lora, nara = variants[0], variants[1]
    r, _, _ = ratio_stats(nara.train_times, lora.train_times)
    f, _, _ = ratio_stats(nara.infer_times, lora.infer_times)
    print()
    print(report(variants))
    print()
    for ph, label in zip(phases, ("fwd+bwd", "forward-only"), strict=True):
        note = " (stopped by --max-seconds)" if ph.out_of_time else ""
        others = "" if ph.foreign_cpu is None else f"; other processes used {100 * ph.foreign_cpu:.0f}% of the CPUs"
        print(
            f"{label}: {ph.kept} rounds used, {ph.discarded} discarded as stalled "
            f"(a variant > {args.stall_factor}× its fastest round){others}{note}"
        )
        if ph.kept < args.repeats or ph.discarded > ph.kept // 4 or (ph.foreign_cpu or 0.0) > 0.1:
            print(f"WARNING: {label} timings were disturbed by other load on this machine; rerun when it is idle.")
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
