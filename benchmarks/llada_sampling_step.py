"""Goal 2: one LLaDA denoising step, NaRA vs unmerged LoRA vs merged LoRA vs the base model.

A step is the sampler's own per-step work (`nara_diffusion.text.sampler._step`): λ of every row read off the canvas
(``noise_rule="generation"``), one forward (logits at the current block only; NaRA gets ``noise_level=λ``: the hook
validates it and the hypernetwork computes C(λ) once for all layers), the proposal (argmax, softmax confidence) and
the commit. Every round restores the same canvas (a block half filled) before each variant's step, outside the clock.

Variants: the base model; LoRA merged into a copy of the weights (costs what the base costs); unmerged peft LoRA;
NaRA with one λ per row, as the sampler passes it. ``--ablations`` adds NaRA given one λ for the whole batch (the
rows of a linear-schedule step all have the same mask ratio, so one core serves the batch) and that plus the core
folded into B (B·Cᵀ, d_out × r, once per layer) instead of multiplying the activations by C.

The share of the step spent on λ and C is measured directly: the λ computation from the canvas, and the model-level
hook (λ validation + hypernetwork + bookkeeping), each timed alone many times, divided by the NaRA step.

    python benchmarks/llada_sampling_step.py                 # CPU, reduced LLaDA (~30 s)
    python benchmarks/llada_sampling_step.py --full          # GPU: LLaDA-8B bf16, batch 1, 256-token prompt + 256
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import _llada as L
import _timing as T
import torch
import torch.nn.functional as F
from torch import nn

import nara_diffusion as nd
from nara_diffusion.core.layer import NaRALinear
from nara_diffusion.core.noise import to_noise_level
from nara_diffusion.core.tuner import find_nara_tuner
from nara_diffusion.text import sampler as S

GOAL_LORA, GOAL_MERGED, GOAL_SHARE = 1.05, 1.10, 0.01


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    L.add_model_args(p)
    p.add_argument("--batch", type=int, default=None, help="rows (default: 2 reduced, 1 full)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: 128 reduced, 256 full)")
    p.add_argument("--gen", type=int, default=None, help="generation length (default: 128 reduced, 256 full)")
    p.add_argument("--block", type=int, default=32, help="block length")
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance scale (doubles the batch)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--ablations", action="store_true", help="add NaRA with one λ per batch, and with C folded into B")
    T.add_device_arg(p)
    T.add_timing_args(p, repeats=30, warmup=3, max_seconds=90.0)
    p.add_argument("--isolated_reps", type=int, default=200, help="repetitions of the isolated λ / C timings")
    p.add_argument("--profile", action="store_true", help="also list the ops NaRA runs that LoRA does not")
    p.add_argument("--profile_steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="smoke run: 5 rounds, 1 warm-up, 20 isolated repetitions")
    args = p.parse_args(argv)
    args.batch = args.batch or (1 if args.full else 2)
    args.prompt = args.prompt or (256 if args.full else 128)
    args.gen = args.gen or (256 if args.full else 128)
    if args.gen % args.block:
        p.error("--gen must be a multiple of --block")
    if args.quick:
        args.repeats, args.warmup, args.isolated_reps, args.max_seconds = 5, 1, 20, min(args.max_seconds, 20.0)
    T.check_timing_args(p, args)
    return args


class SharedLambdaDenoiser(S.Denoiser):
    """Passes the first row's λ for the whole batch (valid when every row has the same mask ratio)."""

    def _forward(self, input_ids, positions, lam, attention_mask):  # type: ignore[no-untyped-def]
        return super()._forward(input_ids, positions, None if lam is None else lam[:1], attention_mask)


def _folded_forward(self: NaRALinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`NaRALinear.forward` with a batch-shared core folded into B: ``x·Aᵀ·(B·Cᵀ)ᵀ`` (ablation only)."""
    result = self.base_layer(x, *args, **kwargs)
    out_dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.nara_A:
            continue
        a, b = self.nara_A[name], self.nara_B[name]
        h = a(self.nara_dropout[name](x.to(a.weight.dtype)))
        core = self.noise_adapters[name].current_core
        if core is not None:  # one core for the batch: [r, r] (or [1, r, r])
            core = core if core.dim() == 2 else core[0]
        weight = b.weight if core is None else b.weight @ core.to(b.weight).T
        result = result + F.linear(h, weight) * self.scaling[name]
    return result.to(out_dtype)


@contextlib.contextmanager
def folded() -> Iterator[None]:
    original = NaRALinear.forward
    NaRALinear.forward = _folded_forward
    try:
        yield
    finally:
        NaRALinear.forward = original


class State:
    """A canvas in the middle of a generation (earlier blocks and half the current block filled), restorable."""

    def __init__(self, args: argparse.Namespace, config: Any, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(args.seed + 1)
        high = config.mask_token_id
        prompts = torch.randint(0, high, (args.batch, args.prompt), generator=gen).to(device)
        self.settings = S._check_settings(
            width=args.prompt,
            gen_length=args.gen,
            steps=args.gen,
            block_length=args.block,
            max_length=None,
            temperature=0.0,
            cfg_scale=args.cfg,
            remasking="low_confidence",
            noise_rule="generation",
            threshold=None,
            mask_id=config.mask_token_id,
            eos_id=config.eos_token_id,
            till_eos=False,
        )
        self.canvas = S._start_canvas(prompts, None, args.gen, config.mask_token_id, args.cfg > 0)
        b = (args.gen // args.block) // 2  # a block in the middle
        self.block = (args.prompt + b * args.block, args.prompt + (b + 1) * args.block)
        filled = self.block[0] + args.block // 2
        self.canvas.x[:, args.prompt : filled] = torch.randint(
            0, high, (args.batch, filled - args.prompt), generator=gen
        )
        self.x0 = self.canvas.x.clone()
        self.k = self.settings.schedule[args.block // 2]
        self.banned = S._id_tensor([config.mask_token_id], device)

    def reset(self) -> None:
        self.canvas.x.copy_(self.x0)

    def step(self, denoise: S.Denoiser) -> None:
        S._step(self.canvas, denoise, self.settings, self.block, self.k, self.banned, None, None)


def isolated_seconds(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Median seconds of one ``fn()`` over ``reps`` calls (CUDA: events around blocks of 10 calls)."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        timer, block = T.make_timer(device), 10

        def ten() -> None:
            for _ in range(block):
                fn()

        return statistics.median(timer(ten) / block for _ in range(max(1, reps // block)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lambda_and_core_costs(state: State, nara: nn.Module, reps: int, device: torch.device) -> dict[str, float]:
    """Seconds of: λ from the canvas; the model-level hook (validation + C + bookkeeping); C alone."""
    tuner = find_nara_tuner(nara)
    hypernet = nd.get_adapter(nara)
    cfg = tuner.peft_config["default"]
    s, canvas = state.settings, state.canvas
    ids, _, noise = S._model_inputs(canvas, s, state.block, True)
    lam = noise.value()
    valid = to_noise_level(lam, cfg.noise_input, cfg.num_train_timesteps, batch_size=ids.shape[0], device=device)

    def from_canvas() -> torch.Tensor:
        return S._model_inputs(canvas, s, state.block, True)[2].value()

    def hook() -> None:
        tuner._begin_forward(tuner.model, (ids,), {"noise_level": lam})
        tuner._end_forward(tuner.model, (ids,), None)

    with torch.no_grad():
        return {
            "λ from the canvas (mask counts, division)": isolated_seconds(from_canvas, reps, device),
            "hook: λ validation + C(λ) + bookkeeping": isolated_seconds(hook, reps, device),
            "of which C(λ) alone (embedding + MLP + I + η·F)": isolated_seconds(
                lambda: hypernet._compute(valid), reps, device
            ),
        }


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, malloc, t_start, load = T.start_run(args)
    config = L.llada_config(args)
    dtype = L.resolve_dtype(args, device)
    base = L.build_base(config, device, dtype, args.seed)
    spec = L.AdapterSpec(r=args.rank, dropout=0.0)
    lora = L.lora(L.shared_copy(base), spec)
    merged = L.merged_lora(base, spec)
    nara = L.nara(L.shared_copy(base), spec)
    variants: list[tuple[str, S.Denoiser, bool]] = [
        ("base model (no adapter)", S.Denoiser(base), False),
        ("LoRA merged", S.Denoiser(merged), False),
        ("peft LoRA (unmerged)", S.Denoiser(lora), False),
        ("NaRA (λ per row, as the sampler passes it)", S.Denoiser(nara), False),
    ]
    if args.ablations:
        variants += [
            ("NaRA, one λ for the batch", SharedLambdaDenoiser(nara), False),
            ("NaRA, one λ, C folded into B", SharedLambdaDenoiser(nara), True),
        ]
    state = State(args, config, device)
    timer = T.make_timer(device)
    rows_per_step = args.batch * (2 if args.cfg > 0 else 1)
    print(T.machine_line(device, malloc))
    print(
        f"{L.describe(config)}; {dtype} base, fp32 adapters; rank {args.rank} on {', '.join(L.TARGETS)}; "
        f"{args.batch} rows × (prompt {args.prompt} + gen {args.gen}), block {args.block}"
        f"{f', CFG {args.cfg} (batch ×2)' if args.cfg > 0 else ''}; {args.repeats} rounds after {args.warmup} warm-up"
    )

    def step(denoise: S.Denoiser, fold: bool) -> Callable[[Any], float]:
        def run(_: Any) -> float:
            state.reset()
            with torch.no_grad(), folded() if fold else contextlib.nullcontext():
                return timer(lambda: state.step(denoise))

        return run

    with contextlib.ExitStack() as stack:
        for _, d, _ in variants:
            stack.enter_context(d)
        phase, rows = T.run_rounds([step(d, f) for _, d, f in variants], lambda: None, args, "sampling")
        if phase.kept == 0:
            raise SystemExit("No clean round within --max_seconds: the machine is too busy.")
        state.reset()
        costs = lambda_and_core_costs(state, nara, args.isolated_reps, device)
        cols = T.columns(rows)
        names = [n for n, _, _ in variants]
        i_base, i_merged, i_lora, i_nara = 0, 1, 2, 3
        table = [
            [
                name,
                T.fmt_ms(col),
                T.fmt_ratio(col, cols[i_lora]),
                T.fmt_ratio(col, cols[i_merged]),
                T.fmt_ratio(col, cols[i_base]),
            ]
            for name, col in zip(names, cols, strict=True)
        ]
        print()
        print(
            T.markdown_table(
                ["variant", "step median (IQR) ms", "/ unmerged LoRA [IQR]", "/ merged LoRA [IQR]", "/ base [IQR]"],
                table,
            )
        )
        print()
        for line in phase.summary("sampling step", args.stall_factor, args.repeats):
            print(line)
        print(load)
        nara_step = statistics.median(cols[i_nara])
        print()
        print(f"λ and C, timed alone ({args.isolated_reps} calls each, median), as a share of the NaRA step:")
        print()
        share_rows = [[k, f"{1e6 * v:.0f}", f"{100 * v / nara_step:.3f} %"] for k, v in costs.items()]
        print(T.markdown_table(["part", "µs", "share of step"], share_rows))
        lam_c = costs["λ from the canvas (mask counts, division)"] + costs["hook: λ validation + C(λ) + bookkeeping"]
        print()
        r_lora, lo, hi = T.ratio_stats(cols[i_nara], cols[i_lora])
        r_merged = T.ratio_stats(cols[i_nara], cols[i_merged])[0]
        print(
            f"goal 2a  NaRA / unmerged LoRA per step: {r_lora:.3f} [IQR {lo:.3f}–{hi:.3f}] "
            f"(≤ {GOAL_LORA}: {T.verdict(r_lora, GOAL_LORA)})"
        )
        scale = "" if args.full and device.type == "cuda" else " (the goal is stated for LLaDA-8B on a GPU)"
        print(
            f"goal 2b  NaRA / merged LoRA per step: {r_merged:.3f} "
            f"(≤ {GOAL_MERGED}{scale}: {T.verdict(r_merged, GOAL_MERGED)})"
        )
        print(
            f"goal 2c  λ update + C(λ) computation: {100 * lam_c / nara_step:.3f} % of a step "
            f"(≤ {100 * GOAL_SHARE:.0f} %: {T.verdict(lam_c / nara_step, GOAL_SHARE)})"
        )
        print(f"(rows per forward: {rows_per_step}; tokens per forward: {rows_per_step * (args.prompt + args.gen)})")

        if args.profile:
            inputs = [None] * args.profile_steps

            def prof(denoise: S.Denoiser) -> Callable[[Any], None]:
                def go(_: Any) -> None:
                    state.reset()
                    with torch.no_grad():
                        state.step(denoise)

                return go

            a = T.profile_ops(prof(variants[i_lora][1]), inputs)
            b = T.profile_ops(prof(variants[i_nara][1]), inputs)
            diff = T.median_ms(cols[i_nara]) - T.median_ms(cols[i_lora])
            print()
            print(f"NaRA-only ops per sampling step (torch.profiler; measured median difference {1e3 * diff:.0f} µs):")
            print()
            print(T.extra_ops_table(a, b))
    print(f"\n(total wall time {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
