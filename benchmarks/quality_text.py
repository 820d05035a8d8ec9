"""Text quality benchmark (issue 15): every method on two toy tasks that do not saturate, with a learning-rate sweep on
a validation split, five training seeds at the chosen rate, 500 test problems, 95% intervals, paired bootstrap
differences against peft's LoRA, and the loss on answer tokens by noise level (the NaRA paper's Figure 1 question).

    python benchmarks/quality_text.py --jobs 2                 # the whole protocol (cached per run: re-run to resume)
    python benchmarks/quality_text.py --quick                  # a smoke test of the whole pipeline in about a minute
    python benchmarks/quality_text.py --methods "LoRA (peft),NaRA" --tasks dif

Protocol, per task and method: train with seed 0 at each learning rate of the method's grid, keep the rate with the
best exact-answer accuracy on the task's 200 validation problems (ties: the smaller rate; a best rate at an edge of
the grid extends it one step past that edge, at most twice), then train seeds 1–4 at it. The five runs at the chosen
rate are scored on the same 500 test problems, the others on validation only (greedy noise-aware sampler at the answer
length the adapter was trained for: one block, one token per step). The table gives mean ± sample std and a 95%
t-interval over the five seeds, and the paired difference to LoRA with a bootstrap interval over seeds and test
problems (`_stats`). The base model's answer-token loss and each profiled method's gain over it at t = 0.1 … 1.0
(same masks for all) go to a plot.

The training data of a task are fixed (``toy.train_records([task], toy.BENCHMARK_TRAIN_SIZE[task], seed=0)``); the
seed changes the adapter's initialisation, the batch order and the masks. Results:
``<output_dir>/quality_text_runs/<task>/<method>/lr<rate>-seed<s>.json`` (one per run; existing ones are reused),
``quality_text.json``, ``quality_text.md`` and ``quality_text_profile.png``. Trained models go to ``--work_dir``
(deleted after scoring).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import _stats
import _timing

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "llada" / "toy"
TS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
BASE = "base model"
REFERENCE = "LoRA (peft)"
#: Methods whose answer-token loss profile is measured (every run of theirs), besides the base model.
PROFILED = ("LoRA (peft)", "NaRA", "NaRA-C")

#: label → FinetuneConfig overrides (adapters matched at about 41k trainable parameters: NaRA r 8 with its (32, 64)
#: hypernetwork 41,120; LoRA and NaRA-C r 10; the noise-bin set K LoRAs of r 10, one active per example).
METHODS: dict[str, dict[str, Any]] = {
    "LoRA (peft)": {"adapter": "lora", "r": 10},
    "NaRA": {"adapter": "nara", "r": 8},
    "NaRA-C": {"adapter": "nara-c", "r": 10},
    "full fine-tuning": {"adapter": "full"},
    "Multi-LoRA (K=4 bins)": {"adapter": "multi-lora", "bins": 4, "r": 10},
    "LIFT + LoRA": {"adapter": "lora", "r": 10, "objective": "lift"},
    "LIFT + NaRA": {"adapter": "nara", "r": 8, "objective": "lift"},
    "DiffoRA-placed NaRA": {"adapter": "nara", "r": 12, "select": "diffora", "sample_rate": 0.5},
}
#: Learning-rate grids: adapters, and full fine-tuning (all 0.88M weights move, so smaller steps). Each grid was
#: widened by one rate after the first sweep chose a rate at its edge (2e-3 for some adapters, 1e-3 for full FT).
ADAPTER_RATES, FULL_RATES = (1e-3, 2e-3, 5e-3, 1e-2), (1e-4, 3e-4, 1e-3, 3e-3)
SEEDS = (0, 1, 2, 3, 4)
#: A sweep whose best rate lies at an edge of its grid is extended past that edge (one geometric step further) and
#: re-chosen, at most this many times, so the chosen rate is an interior one or the table says "(edge)".
MAX_EXTENSIONS = 2


@dataclass(frozen=True)
class Budget:
    """What one run trains on and is scored on."""

    tasks: tuple[str, ...]
    n_train: Optional[int] = None  # None: the task's `toy.BENCHMARK_TRAIN_SIZE`
    max_steps: int = 300
    max_length: int = 48  # the toy prompts are 37 tokens: 11 answer positions, for answers of at most 3 digits + EOS
    n_val: int = 200
    n_test: int = 500
    seeds: tuple[int, ...] = SEEDS


def full_budget() -> Budget:
    from nara_diffusion.toy import text as toy

    return Budget(tasks=toy.BENCHMARK_TASKS)


def quick_budget(tasks: tuple[str, ...]) -> Budget:
    return Budget(tasks=tasks[:1], n_train=64, max_steps=6, n_val=8, n_test=16, seeds=(0, 1))


def rates(label: str, quick: bool) -> tuple[float, ...]:
    grid = FULL_RATES if METHODS[label]["adapter"] == "full" else ADAPTER_RATES
    return grid[-2:] if quick else grid


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


# -- one run (in a worker process) ----------------------------------------------------------------------------------
def run_one(
    task: str, label: str, lr: float, seed: int, budget: Budget, out: Path, work: Path, final: bool = True
) -> dict[str, Any]:
    """Train one method once and score it on the validation problems, and (``final``) on the test problems, with the
    loss profiles of `PROFILED` methods; cached as JSON under ``out``. A sweep run (not ``final``) keeps its trained
    model under ``work`` until the protocol knows whether its rate was chosen; ``final`` on a kept run scores it."""
    from nara_diffusion.toy import text as toy

    path = out / "quality_text_runs" / task / _slug(label) / f"lr{lr:g}-seed{seed}.json"
    n_train = budget.n_train or toy.BENCHMARK_TRAIN_SIZE[task]
    settings = {k: v for k, v in vars(budget).items() if k not in ("tasks", "seeds")} | {"n_train": n_train}
    run_dir = _run_dir(work, task, label, lr, seed)
    if path.is_file():
        record = _cached(path, settings)
        if not final or "test_accuracy" in record:
            return record
        if (run_dir / "run" / "final").is_dir():
            return _finish(record, path, run_dir, task, label, budget)
    os.environ["TQDM_DISABLE"] = "1"  # a worker process: only the parent's bar over the runs
    import torch

    from nara_diffusion.text import FinetuneConfig, run_finetune

    torch.set_num_threads(1)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run killed half-way leaves a partial folder
    run_dir.mkdir(parents=True, exist_ok=True)
    train_file = run_dir / "train.json"
    train_file.write_text(json.dumps(toy.train_records([task], n_train, seed=0)))
    config = FinetuneConfig(
        **{
            **toy.FINETUNE_DEFAULTS,
            **METHODS[label],
            "learning_rate": lr,
            "max_steps": budget.max_steps,
            "max_length": budget.max_length,
            "model": str(TOY),
            "dataset": str(train_file),
            "seed": seed,
            "output_dir": str(run_dir / "run"),
            "report_to": "none",
        }
    )
    start = time.time()
    result = run_finetune(config)
    minutes = (time.time() - start) / 60
    model, tokenizer = _load(result.final_dir, METHODS[label]["adapter"])
    scored = score(model, tokenizer, toy.validation_records(task, budget.n_val), budget)
    record: dict[str, Any] = {
        "task": task,
        "method": label,
        "learning_rate": lr,
        "seed": seed,
        "trainable_parameters": trainable_parameters(result.final_dir),
        "train_minutes": round(minutes, 2),
        "budget": settings,
        "validation_accuracy": scored.accuracy,
        "validation_correct": "".join("1" if r["correct"] else "0" for r in scored.records),
    }
    if not final:
        _write(path, record)
        return record
    return _finish(record, path, run_dir, task, label, budget, (model, tokenizer))


def _run_dir(work: Path, task: str, label: str, lr: float, seed: int) -> Path:
    return work / task / _slug(label) / f"lr{lr:g}-seed{seed}"


def _finish(
    record: dict[str, Any],
    path: Path,
    run_dir: Path,
    task: str,
    label: str,
    budget: Budget,
    loaded: Optional[tuple[Any, Any]] = None,
) -> dict[str, Any]:
    """Score a trained run on the test problems (and profile it), write its record, delete the trained model."""
    from nara_diffusion.toy import text as toy

    model, tokenizer = loaded or _load(run_dir / "run" / "final", METHODS[label]["adapter"])
    scored = score(model, tokenizer, toy.test_records(task, budget.n_test), budget)
    record = {**record, "test_accuracy": scored.accuracy}
    record["test_correct"] = "".join("1" if r["correct"] else "0" for r in scored.records)
    if label in PROFILED:
        record["profile_answer"] = profile(model, tokenizer, task, budget, "answer")
        record["profile_all"] = profile(model, tokenizer, task, budget, "all")
    _write(path, record)
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def _cached(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """A finished run's record, refused if it was made with other settings (a stale cache must not mix in)."""
    record = json.loads(path.read_text())
    if record.get("budget") != settings:
        raise SystemExit(
            f"{path} was made with {record.get('budget')}, not {settings}: delete the stale results or pass another "
            "--output_dir."
        )
    return record


def _load(folder: Path, adapter: str) -> tuple[Any, Any]:
    from nara_diffusion.text import load_for_inference
    from nara_diffusion.text.loading import load_adapter

    if adapter == "full":
        return load_for_inference(str(folder))
    base, tokenizer = load_for_inference(None, str(TOY))
    return load_adapter(base, folder).eval(), tokenizer


def score(model: Any, tokenizer: Any, records: list[dict], budget: Budget) -> Any:
    """Exact-answer accuracy at the trained answer length: one block, one token per step, greedy."""
    from nara_diffusion.text.scoring import evaluate_generation

    gen = answer_positions(budget, tokenizer)
    return evaluate_generation(
        model, tokenizer, records, kind="exact", batch_size=100, gen_length=gen, steps=gen, block_length=gen
    )


def answer_positions(budget: Budget, tokenizer: Any) -> int:
    """The answer positions the toy fine-tunes train (max_length minus the toy prompt's length)."""
    from nara_diffusion.text.data import to_prompt_answer, tokenize_sft
    from nara_diffusion.toy import text as toy

    probe = tokenize_sft(
        tokenizer, to_prompt_answer(toy.test_records(budget.tasks[0], 1)), max_length=budget.max_length
    )
    return budget.max_length - int(probe.prompt_lengths[0])


def profile(model: Any, tokenizer: Any, task: str, budget: Budget, tokens: str) -> list[float]:
    """Loss at each t of `TS` on the test problems (``tokens="answer"``: answer tokens only; ``"all"``: the ELBO)."""
    import torch

    from nara_diffusion.text.data import to_prompt_answer, tokenize_sft
    from nara_diffusion.text.noise_profile import noise_profile
    from nara_diffusion.toy import text as toy

    data = tokenize_sft(
        tokenizer, to_prompt_answer(toy.test_records(task, budget.n_test)), max_length=budget.max_length
    )
    with torch.no_grad():
        return noise_profile(model, data, TS, batch_size=100, tokens=tokens).tolist()


def trainable_parameters(folder: Path) -> int:
    """Parameters in the saved weights of a run (adapter, noise-bin set or full model); NaRA's fixed Fourier
    features (``…fourier.W``, a saved buffer) are not counted."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".W"))
    return total


def base_record(task: str, budget: Budget, out: Path) -> dict[str, Any]:
    """The base model's test accuracy and profiles (cached like a run)."""
    path = out / "quality_text_runs" / task / "base.json"
    settings = {"max_length": budget.max_length, "n_test": budget.n_test}
    if path.is_file():
        return _cached(path, settings)
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    from nara_diffusion.text import load_for_inference
    from nara_diffusion.toy import text as toy

    torch.set_num_threads(1)
    model, tokenizer = load_for_inference(None, str(TOY))
    scored = score(model, tokenizer, toy.test_records(task, budget.n_test), budget)
    record = {
        "task": task,
        "budget": settings,
        "test_accuracy": scored.accuracy,
        "test_correct": "".join("1" if r["correct"] else "0" for r in scored.records),
        "profile_answer": profile(model, tokenizer, task, budget, "answer"),
        "profile_all": profile(model, tokenizer, task, budget, "all"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


# -- the protocol ---------------------------------------------------------------------------------------------------
def run_protocol(labels: list[str], budget: Budget, out: Path, work: Path, jobs: int, quick: bool) -> dict:
    """Sweep (extended past an edge that wins, `MAX_EXTENSIONS`), then seeds, for every task × method; returns
    ``{task: {label: [records at the chosen rate]}, "_sweeps": {"task|label": [seed-0 records by rate]}}``."""
    from tqdm.auto import tqdm

    seed0 = budget.seeds[0]
    grids = {(t, m): list(rates(m, quick)) for t in budget.tasks for m in labels}
    sweep = [(t, m, lr, seed0) for (t, m), grid in grids.items() for lr in grid]
    total = len(sweep) + len(budget.tasks) * len(labels) * len(budget.seeds)  # the chosen sweep runs' test: 1 each
    bar = tqdm(total=total, desc="runs", unit="run")
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        bases = [pool.submit(base_record, t, budget, out) for t in budget.tasks]
        swept = _gather(pool, sweep, budget, out, work, bar, final=False)
        for _ in range(0 if quick else MAX_EXTENSIONS):
            more = [(t, m, lr, seed0) for (t, m), grid in grids.items() if (lr := _extend(grid, swept, t, m, seed0))]
            if not more:
                break
            bar.total += len(more)
            bar.refresh()
            swept.update(_gather(pool, more, budget, out, work, bar, final=False))
        chosen = {(t, m): _choose([swept[(t, m, lr, seed0)] for lr in grid]) for (t, m), grid in grids.items()}
        # the chosen sweep runs are scored on the test problems (from their kept models); the others never are
        rest = [(t, m, chosen[(t, m)], s) for t in budget.tasks for m in labels for s in budget.seeds]
        done = {**swept, **_gather(pool, rest, budget, out, work, bar)}
        for b in bases:
            b.result()
    for (t, m), grid in grids.items():
        for lr in grid:
            if lr != chosen[(t, m)]:
                shutil.rmtree(_run_dir(work, t, m, lr, seed0), ignore_errors=True)
    bar.close()
    results: dict[str, Any] = {
        t: {m: [done[(t, m, chosen[(t, m)], s)] for s in budget.seeds] for m in labels} for t in budget.tasks
    }
    results["_sweeps"] = {f"{t}|{m}": [swept[(t, m, lr, seed0)] for lr in grid] for (t, m), grid in grids.items()}
    return results


def _extend(grid: list[float], swept: dict, task: str, label: str, seed: int) -> Optional[float]:
    """If the best rate of ``grid`` (ascending) is at an edge, add the next rate past it (the grid's geometric step
    there, one significant digit) to ``grid`` and return it; else None."""
    best = _choose([swept[(task, label, lr, seed)] for lr in grid])
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return None
    lower = best == grid[0]
    rate = float(f"{(grid[0] ** 2 / grid[1]) if lower else (grid[-1] ** 2 / grid[-2]):.1g}")
    if lower:
        grid.insert(0, rate)
    else:
        grid.append(rate)
    return rate


def _gather(
    pool: Any, keys: list[tuple], budget: Budget, out: Path, work: Path, bar: Any, final: bool = True
) -> dict[tuple, dict]:
    futures = {pool.submit(run_one, *key, budget, out, work, final): key for key in keys}
    results = {}
    split = "test" if final else "validation"
    for future in cf.as_completed(futures):
        key = futures[future]
        results[key] = future.result()
        accuracy = results[key][f"{split}_accuracy"]
        bar.set_postfix_str(f"{key[0]} {key[1]} lr {key[2]:g} seed {key[3]}: {split} {accuracy:.1%}")
        bar.update()
    return results


def _choose(sweep: list[dict]) -> float:
    """The learning rate with the best validation accuracy (ties: the smaller rate)."""
    best = max(sweep, key=lambda r: (r["validation_accuracy"], -r["learning_rate"]))
    return best["learning_rate"]


# -- tables and the plot --------------------------------------------------------------------------------------------
def _bits(s: str) -> list[float]:
    return [float(c) for c in s]


def tables(results: dict, budget: Budget, out: Path) -> str:
    """The Markdown report: per task, the accuracy table and the answer-token gain by noise level."""
    sweeps = results["_sweeps"]
    parts = []
    summary: dict[str, Any] = {"budget": vars(budget) | {"tasks": list(budget.tasks)}, "ts": TS, "tasks": {}}
    for task in budget.tasks:
        base = json.loads((out / "quality_text_runs" / task / "base.json").read_text())
        runs = results[task]
        ref = [_bits(r["test_correct"]) for r in runs.get(REFERENCE, [])]
        header = ["method", "trainable params", "lr (val. acc. % per rate)", "test acc. % mean ± std [95% CI]",
                  "per seed", f"Δ vs {REFERENCE} [95% CI]"]  # fmt: skip
        rows = [[BASE, "0", "–", f"{100 * base['test_accuracy']:.1f}", "–", "–"]]
        task_summary: dict[str, Any] = {}
        for label, records in runs.items():
            accs = [r["test_accuracy"] for r in records]
            s = _stats.summarize(accs)
            sweep = sweeps[f"{task}|{label}"]
            chosen = records[0]["learning_rate"]
            grid = ", ".join(
                f"{'**' if r['learning_rate'] == chosen else ''}{r['learning_rate']:g}: "
                f"{100 * r['validation_accuracy']:.0f}{'**' if r['learning_rate'] == chosen else ''}"
                for r in sweep
            )
            if chosen in (sweep[0]["learning_rate"], sweep[-1]["learning_rate"]):
                grid += " (edge)"  # the best rate may lie outside the grid
            diff = "–"
            if ref and label != REFERENCE:
                diff = _stats.paired_bootstrap([_bits(r["test_correct"]) for r in records], ref).pct()
            rows.append([label, f"{records[0]['trainable_parameters']:,}", grid, s.pct(),
                         " / ".join(f"{100 * a:.1f}" for a in accs), diff])  # fmt: skip
            task_summary[label] = {"accuracy": accs, "summary": vars(s), "learning_rate": chosen,
                                   "sweep": {r["learning_rate"]: r["validation_accuracy"] for r in sweep}}  # fmt: skip
        parts.append(f"### Task `{task}`\n\n" + _timing.markdown_table(header, rows))
        gains = profile_gains(base, runs)
        if gains:
            parts.append(gain_table(gains))
        summary["tasks"][task] = {"methods": task_summary, "base": base["test_accuracy"], "gains": gains}
    plot = plot_gains(summary, out / "quality_text_profile.png")
    (out / "quality_text.json").write_text(json.dumps(summary, indent=1))
    return "\n\n".join(parts) + f"\n\nPlot: `{plot.name}`\n"


def profile_gains(base: dict, runs: dict) -> dict[str, dict[str, list[dict]]]:
    """Per profiled method and t, the answer-token loss reduction (mean and 95% t-interval over seeds) vs the base
    model (``"base"``) and, paired by seed, vs LoRA (``"lora"``: positive where the method's loss is lower)."""
    gains: dict[str, dict[str, list[dict]]] = {}
    ref = runs.get(REFERENCE)
    for label in PROFILED:
        if label not in runs:
            continue
        recs = runs[label]
        gains[label] = {
            "base": [vars(_stats.summarize([base["profile_answer"][i] - r["profile_answer"][i] for r in recs]))
                     for i in range(len(TS))],
        }  # fmt: skip
        if ref is not None and label != REFERENCE:
            pairs = list(zip(ref, recs, strict=True))
            gains[label]["lora"] = [
                vars(_stats.summarize([a["profile_answer"][i] - b["profile_answer"][i] for a, b in pairs]))
                for i in range(len(TS))
            ]
    return gains


def gain_table(gains: dict[str, dict[str, list[dict]]]) -> str:
    header = ["answer-token loss reduction (nats), mean [95% CI]", *(f"t={t:g}" for t in TS)]
    rows = []
    for versus, name in (("base", "vs base"), ("lora", f"vs {REFERENCE}")):
        for label, per in gains.items():
            if versus in per:
                cells = [f"{g['mean']:.2f} [{g['low']:.2f}, {g['high']:.2f}]" for g in per[versus]]
                rows.append([f"{label} {name}", *cells])
    return _timing.markdown_table(header, rows)


def plot_gains(summary: dict, path: Path) -> Path:
    """Per task (columns): each profiled method's answer-token loss reduction by t over the base model (top) and over
    LoRA (bottom, paired by seed), with 95% t-intervals over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(PROFILED)}
    for col, task in enumerate(tasks):
        for row, (versus, what) in enumerate((("base", "the base model"), ("lora", REFERENCE))):
            ax = axes[row, col]
            for k, (label, per) in enumerate(summary["tasks"][task]["gains"].items()):
                if versus not in per:
                    continue
                xs = [t + (k - 1) * 0.012 for t in TS]  # a small offset so that the intervals do not hide each other
                mean = [g["mean"] for g in per[versus]]
                err = [[g["mean"] - g["low"] for g in per[versus]], [g["high"] - g["mean"] for g in per[versus]]]
                ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=label, color=colors[label])
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set(xlabel="noise level t (fraction of answer positions masked)",
                   ylabel="nats / answer token", title=f"'{task}': loss reduction vs {what}")  # fmt: skip
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    seeds = len(summary["budget"]["seeds"])
    fig.suptitle(f"Answer-token loss by noise level: where fine-tuning helps (mean of {seeds} seeds, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=ROOT / "benchmarks" / "results", help="tables and runs")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs" / "quality_text", help="trained models")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each")
    parser.add_argument("--methods", default=None, help=f"comma-separated labels (default: all of {list(METHODS)})")
    parser.add_argument("--tasks", default=None, help="comma-separated toy tasks (default: the benchmark tasks)")
    parser.add_argument("--quick", action="store_true", help="tiny budget, one task, two seeds: a smoke test")
    args = parser.parse_args(argv)
    import torch

    budget = full_budget()
    if args.tasks:
        budget = Budget(tasks=tuple(t.strip() for t in args.tasks.split(",")))
    labels = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(labels) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.quick:
        budget = quick_budget(budget.tasks)
        if args.output_dir == parser.get_default("output_dir"):
            args.output_dir = args.output_dir / "quick"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(_timing.machine_line(torch.device("cpu")), flush=True)
    start = time.time()
    results = run_protocol(labels, budget, args.output_dir, args.work_dir, args.jobs, args.quick)
    report = tables(results, budget, args.output_dir)
    (args.output_dir / "quality_text.md").write_text(report)
    print(report)
    print(f"{(time.time() - start) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
