"""Issue 17: Fast-dLLM-class decoding — the block-wise K/V cache, threshold decoding, and NaRA's cost per step.

Parts (``--parts``, default all; ratios are measured side by side in one run, rounds in rotating order):

- ``speed``: a reduced LLaDA with the 8B block structure (d_model 512, 8 blocks, head size 128, MLP 3·d, random
  weights), prompt 128, generation 256, block 32, one whole greedy `generate` per variant and round: time per
  generated token for ``cache=None`` / ``"prefix"`` / ``"dual"``, from caching alone (no threshold). A reverse step
  of the uncached sampler costs a full forward, so ``--speed_steps`` (default 64: 8 per block) keeps a round short;
  more steps per block favour the cache (its full forward is paid once per block).
- ``cost``: NaRA / unmerged peft LoRA (rank 32 on q, k, v, attn_out) over a whole `generate`, with and without the
  dual cache: the small model of the issue (d_model 256, 4 blocks, prompt 32, gen 32, block 8, 32 steps), where
  the fixed per-step cost shows, and the reduced one (prompt 128, gen 32, block 32, 32 steps). NaRA twice: as one
  call (the cores of the λ grid k / gen_length computed in one hypernetwork run when the call starts) and inside
  `memoize_cores`, as `generate_texts` and the lm-eval model run their batches (the grid is computed once, by the
  first call).
- ``toy``: the toy LLaDA with a trained NaRA adapter (``--adapter``, e.g. the embedded default run of
  ``examples/llada/finetune.py``) on its task's held-out problems, at the adapter's trained length (its
  ``sampling.json``): accuracy and wall time per problem for the plain, threshold, cached and combined samplers.

    python benchmarks/llada_fast_decoding.py --adapter /tmp/fast-toy/final      # CPU, ~10 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import _llada as L
import _timing as T
import torch
from torch import nn

from nara_diffusion.text.sampler import generate, memoize_cores

ROOT = Path(__file__).resolve().parents[1]
GOAL_SPEED, GOAL_COST, GOAL_QUALITY = 3.0, 1.05, 1.0
# (label, cache, threshold) of the toy part
# (label, cache, threshold) of the toy part; at the trained length the generation is one block, so the prefix cache
# is the dual cache (nothing follows the block)
TOY_MODES = [
    ("plain (cache None)", None, None),
    ("threshold 0.9", None, 0.9),
    ("dual cache", "dual", None),
    ("dual cache + threshold 0.9", "dual", 0.9),
    ("dual cache + threshold 0.7", "dual", 0.7),
]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="speed,cost,toy", help="comma-separated: speed, cost, toy")
    p.add_argument("--speed_layers", type=int, default=8)
    p.add_argument("--speed_prompt", type=int, default=128)
    p.add_argument("--speed_gen", type=int, default=256)
    p.add_argument("--speed_block", type=int, default=32)
    p.add_argument("--speed_steps", type=int, default=64, help="reverse steps in all (gen: one token per step)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--cost_sizes", default="small,reduced", help="cost part: small (d256), reduced (d512), or both")
    p.add_argument("--adapter", default=None, help="trained toy NaRA adapter folder (toy part; skipped without)")
    p.add_argument("--task", default="amp", help="toy task of the held-out problems")
    p.add_argument("--problems", type=int, default=500, help="held-out problems (at most the task's test split)")
    p.add_argument("--toy_batch", type=int, default=50, help="prompts per sampler batch in the toy part")
    p.add_argument("--toy_repeats", type=int, default=1, help="timed passes over the problems per toy mode")
    T.add_device_arg(p)
    T.add_timing_args(p, repeats=3, warmup=1, max_seconds=900.0)
    args = p.parse_args(argv)
    T.check_timing_args(p, args)
    return args


def _model_args(d_model: int, layers: int) -> argparse.Namespace:
    """`_llada.llada_config` arguments: head size 128, MLP 3·d, the reduced vocabulary."""
    return argparse.Namespace(
        full=False, d_model=d_model, layers=layers, heads=max(1, d_model // 128), mlp=3 * d_model, vocab=None
    )


def _prompt(config: Any, length: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.mask_token_id - 1, (1, length), generator=gen).to(device)


def _timed_generate(model: nn.Module, ids: torch.Tensor, **kw: Any) -> Callable[[Any], float]:
    def run(_: Any) -> float:
        start = time.perf_counter()
        generate(model, ids, **kw)
        return time.perf_counter() - start

    return run


def part_speed(args: argparse.Namespace, device: torch.device) -> list[str]:
    config = L.llada_config(_model_args(512, args.speed_layers))
    base = L.build_base(config, device, torch.float32, args.seed)
    ids = _prompt(config, args.speed_prompt, args.seed, device)
    kw = {"gen_length": args.speed_gen, "steps": args.speed_steps, "block_length": args.speed_block}
    modes = [None, "prefix", "dual"]
    phase, rows = T.run_rounds([_timed_generate(base, ids, cache=m, **kw) for m in modes], lambda: None, args, "speed")
    cols = T.columns(rows)
    per_token = [1e3 * statistics.median(c) / args.speed_gen for c in cols]
    table = [
        [f"cache={m!r}", f"{t:.2f}", f"{per_token[0] / t:.2f}×", T.fmt_ratio(cols[0], c)]
        for m, t, c in zip(modes, per_token, cols, strict=True)
    ]
    speedup = statistics.median(a / b for a, b in zip(cols[0], cols[2], strict=True))
    return [
        f"### Speed: {L.describe(config)}, batch 1, prompt {args.speed_prompt}, gen {args.speed_gen}, "
        f"block {args.speed_block}, {args.speed_steps} steps ({args.speed_steps * args.speed_block // args.speed_gen} "
        "per block), greedy, no threshold",
        "",
        T.markdown_table(["sampler", "ms / generated token", "speed-up (medians)", "None / this, per round"], table),
        "",
        *phase.summary("speed", args.stall_factor, args.repeats),
        f"goal  cache='dual' vs None, time per token: {speedup:.2f}× (≥ {GOAL_SPEED}×: "
        f"{'met' if speedup >= GOAL_SPEED else 'NOT met'})",
    ]


def _cost_case(
    args: argparse.Namespace, device: torch.device, d_model: int, layers: int, prompt: int, gen: int, block: int
) -> tuple[list[list[str]], list[str], list[float]]:
    config = L.llada_config(_model_args(d_model, layers))
    base = L.build_base(config, device, torch.float32, args.seed)
    spec = L.AdapterSpec(r=args.rank, dropout=0.0)
    lora = L.lora(L.shared_copy(base), spec).eval()
    nara = L.nara(L.shared_copy(base), spec).eval()  # memoises its cores within each `generate` call
    looped = L.nara(L.shared_copy(base), spec).eval()  # and across calls, as generate_texts / lm-eval's loop do
    ids = _prompt(config, prompt, args.seed, device)
    kw = {"gen_length": gen, "steps": gen, "block_length": block, "till_eos": False}
    variants = [(m, c) for c in (None, "dual") for m in (lora, nara, looped)]
    steps = [_timed_generate(m, ids, cache=c, **kw) for m, c in variants]
    with memoize_cores(looped):
        phase, rows = T.run_rounds(steps, lambda: None, args, f"cost d{d_model}")
    cols = T.columns(rows)
    label = f"{L.describe(config)}, prompt {prompt}, gen {gen}, block {block}, {gen} steps"
    table, ratios = [], []
    for i, cache in enumerate((None, "dual")):
        lo, na, lp = cols[3 * i : 3 * i + 3]
        ratios += [statistics.median(b / a for a, b in zip(lo, x, strict=True)) for x in (na, lp)]
        table.append(
            [
                label if cache is None else "",
                f"cache={cache!r}",
                T.fmt_ms(lo),
                T.fmt_ms(na),
                T.fmt_ratio(na, lo),
                T.fmt_ms(lp),
                T.fmt_ratio(lp, lo),
            ]
        )
    return table, phase.summary(f"cost d{d_model}", args.stall_factor, args.repeats), ratios


def part_cost(args: argparse.Namespace, device: torch.device) -> list[str]:
    rows, summaries, ratios = [], [], []
    cases = {"small": (256, 4, 32, 32, 8), "reduced": (512, args.speed_layers, 128, 32, 32)}
    for name in args.cost_sizes.split(","):
        table, summary, r = _cost_case(args, device, *cases[name.strip()])
        rows += table
        summaries += summary
        ratios += r
    header = ["model", "sampler", "peft LoRA (unmerged), ms", "NaRA, ms", "NaRA / LoRA", "NaRA in a loop, ms"]
    return [
        f"### Cost of NaRA per decoding step: whole greedy `generate`, batch 1, rank {args.rank} on "
        f"{', '.join(L.TARGETS)}, A/B rounds in rotating order. NaRA computes the cores of its λ grid in one "
        "hypernetwork run when each call starts; 'in a loop' once for all calls, as "
        "`generate_texts` and the lm-eval model do over their batches (`memoize_cores`)",
        "",
        T.markdown_table([*header, "in a loop / LoRA"], rows),
        "",
        *summaries,
        f"goal  NaRA / unmerged LoRA, worst case: {max(ratios[0::2]):.3f} per call, {max(ratios[1::2]):.3f} in a "
        f"loop (≤ {GOAL_COST}: {T.verdict(max(ratios[0::2]), GOAL_COST)} / {T.verdict(max(ratios[1::2]), GOAL_COST)})",
    ]


def part_toy(args: argparse.Namespace, device: torch.device) -> list[str]:
    from nara_diffusion.text.loading import load_for_inference
    from nara_diffusion.text.scoring import evaluate_generation
    from nara_diffusion.text.trained_sampling import sampler_settings
    from nara_diffusion.toy import text as toy

    model, tokenizer = load_for_inference(args.adapter, None, "float32")
    model.to(device)
    records = toy.test_records(args.task, args.problems)
    lengths = sampler_settings(model, {})
    results: dict[str, Any] = {}
    times: dict[str, list[float]] = {label: [] for label, _, _ in TOY_MODES}
    tokens: list[int] = []  # positions run through the model, per forward: a cost measure that ignores the load
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.register_forward_pre_hook(
        lambda m, a, kw: tokens.append((a[0] if a else kw["input_ids"]).numel()), with_kwargs=True
    )
    work: dict[str, tuple[int, int]] = {}
    evaluate_generation(model, tokenizer, records[: args.toy_batch], kind="exact", batch_size=args.toy_batch)  # warm-up
    for rnd in range(args.toy_repeats):  # greedy: every pass gives the same answers
        order = TOY_MODES[rnd % len(TOY_MODES) :] + TOY_MODES[: rnd % len(TOY_MODES)]
        for label, cache, threshold in order:
            tokens.clear()
            start = time.perf_counter()
            results[label] = evaluate_generation(
                model, tokenizer, records, kind="exact", batch_size=args.toy_batch, cache=cache, threshold=threshold
            )
            times[label].append(time.perf_counter() - start)
            work[label] = (len(tokens), sum(tokens))
    plain = statistics.median(times[TOY_MODES[0][0]])
    plain_work = work[TOY_MODES[0][0]][1]
    base_acc = results[TOY_MODES[0][0]].accuracy
    batches = -(-len(records) // args.toy_batch)
    rows = []
    for label, _, _ in TOY_MODES:
        t = statistics.median(times[label])
        acc = results[label].accuracy
        rows.append(
            [
                label,
                f"{100 * acc:.2f}% ({results[label].correct}/{results[label].total})",
                f"{100 * (acc - base_acc):+.2f}",
                f"{1e3 * t / len(records):.2f}",
                f"{plain / t:.2f}×",
                f"{work[label][0] / batches:.1f}",
                f"{plain_work / work[label][1]:.2f}×",
            ]
        )
    fast = results["dual cache + threshold 0.9"].accuracy
    return [
        f"### Toy task `{args.task}`: trained NaRA adapter ({args.adapter}), {len(records)} held-out problems, "
        f"batches of {args.toy_batch}, the trained lengths (gen {lengths['gen_length']}, block "
        f"{lengths['block_length']}, {lengths['steps']} steps), greedy; time: median of {args.toy_repeats} passes",
        "",
        T.markdown_table(
            ["sampler", "accuracy", "Δ points", "ms / problem", "speed-up", "forwards / batch", "fewer positions run"],
            rows,
        ),
        "",
        f"goal  dual cache + threshold 0.9 within {GOAL_QUALITY} point of the plain sampler: "
        f"{100 * (fast - base_acc):+.2f} points ({'met' if abs(fast - base_acc) * 100 <= GOAL_QUALITY else 'NOT met'})",
    ]


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, malloc, t_start, load = T.start_run(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    print(T.machine_line(device, malloc))
    print(load)
    print(f"command: python benchmarks/llada_fast_decoding.py {' '.join(sys.argv[1:])}")
    runners = {"speed": part_speed, "cost": part_cost, "toy": part_toy}
    for part in parts:
        if part == "toy" and args.adapter is None:
            print("\n(toy part skipped: no --adapter)")
            continue
        print()
        with torch.no_grad():
            for line in runners[part](args, device):
                print(line)
        sys.stdout.flush()
    print(f"\n(total wall time {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
