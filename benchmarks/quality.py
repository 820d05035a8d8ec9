"""Quality benchmark on the toy bases (issue 7): every method, 3 seeds, mean ± std, plus the noise-level loss profile.

    python benchmarks/quality.py text  --seeds 0 1 2 --output_dir benchmarks/results
    python benchmarks/quality.py image --seeds 0 1 2 --output_dir benchmarks/results

Text: the toy LLaDA (``examples/llada/toy``) is fine-tuned on the downstream task it cannot do ("What is 63&45?", "&"
for subtraction; the 1,000 training problems of ``examples/llada/data/toy_amp_train.json``) with each method at the
example's toy settings (`nara_diffusion.toy.text.FINETUNE_DEFAULTS`), and scored by exact-answer accuracy on the 100
held-out problems of ``toy_amp_test.json`` with the noise-aware sampler (greedy, 8 tokens, 8 steps). The adapters are
matched in trainable parameters (≈ 41k; full fine-tuning trains all 0.88M, the noise-bin set K LoRAs of that size,
one active per example). The loss profile is LLaDA's masked-diffusion loss on the test problems at fixed t, the same
masks for every model, averaged over the seeds. Image: see ``quality_image.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import _timing
import torch
from safetensors import safe_open

from nara_diffusion.text import FinetuneConfig, load_for_inference, run_finetune
from nara_diffusion.text.data import to_prompt_answer, tokenize_sft
from nara_diffusion.text.loading import load_adapter
from nara_diffusion.text.noise_profile import noise_profile, plot_noise_profiles
from nara_diffusion.toy import text as toy

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "llada" / "toy"
DATA = ROOT / "examples" / "llada" / "data"
TS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

#: label → FinetuneConfig overrides on top of the toy defaults (NaRA r 8 = 41,120 trainable parameters).
METHODS: dict[str, dict] = {
    "full fine-tuning": {"adapter": "full", "learning_rate": 3e-4},
    "LoRA (peft)": {"adapter": "lora", "r": 10},
    "NaRA": {"adapter": "nara", "r": 8},
    "NaRA-C": {"adapter": "nara-c", "r": 10},
    "Multi-LoRA (K=4 bins)": {"adapter": "multi-lora", "bins": 4, "r": 10},
    "LIFT + LoRA": {"adapter": "lora", "r": 10, "objective": "lift"},
    "LIFT + NaRA": {"adapter": "nara", "r": 8, "objective": "lift"},
    "DiffoRA-placed NaRA": {"adapter": "nara", "r": 12, "select": "diffora", "sample_rate": 0.5},
}
BASE = "base model"


def trainable_parameters(folder: Path) -> int:
    """Parameters in the saved weights of a run (adapter, noise-bin set or full model); NaRA's fixed Fourier
    features (``…fourier.W``, a saved buffer) are not counted."""
    total = 0
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".W"))
    return total


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def run_method(label: str, seeds: list[int], out: Path) -> dict:
    """Train and score one method for every seed; the result is also written to ``out/quality_text_runs``."""
    runs = out / "quality_text_runs"
    tokenizer = load_for_inference(None, str(TOY))[1]
    profile_set = tokenize_sft(
        tokenizer, to_prompt_answer(toy.test_records(toy.DOWNSTREAM_TASK, 100)), max_length=toy.MAX_LENGTH
    )
    overrides = METHODS[label]
    record: dict = {"accuracy": [], "accuracy_before": [], "profiles": [], "minutes": []}
    for seed in seeds:
        config = FinetuneConfig(
            **{
                **toy.FINETUNE_DEFAULTS,
                **overrides,
                "model": str(TOY),
                "dataset": str(DATA / "toy_amp_train.json"),
                "test_dataset": str(DATA / "toy_amp_test.json"),
                "test_kind": "exact",
                "test_gen_length": toy.SAMPLER["gen_length"],
                "test_steps": toy.SAMPLER["steps"],
                "test_block_length": toy.SAMPLER["block_length"],
                "test_batch_size": 50,
                "seed": seed,
                "output_dir": str(runs / _slug(label) / f"seed{seed}"),
            }
        )
        start = time.time()
        result = run_finetune(config)
        record["minutes"].append((time.time() - start) / 60)
        record["accuracy"].append(result.metrics["test_accuracy_after"])
        record["accuracy_before"].append(result.metrics["test_accuracy_before"])
        record["trainable_parameters"] = trainable_parameters(result.final_dir)
        record["profiles"].append(_profile_of(result.final_dir, overrides["adapter"], profile_set))
        print(f"{label} seed {seed}: accuracy {record['accuracy'][-1]:.1%} ({record['minutes'][-1]:.1f} min)")
    record["profile"] = [statistics.fmean(col) for col in zip(*record["profiles"], strict=True)]
    (runs / f"{_slug(label)}.json").write_text(json.dumps(record, indent=1))
    return record


def text_table(seeds: list[int], out: Path) -> str:
    """The Markdown table and the noise-profile plot from the per-method results in ``out/quality_text_runs``."""
    runs = out / "quality_text_runs"
    missing = [label for label in METHODS if not (runs / f"{_slug(label)}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"No results yet for {missing}; run them with --methods first.")
    results = {label: json.loads((runs / f"{_slug(label)}.json").read_text()) for label in METHODS}
    base_model, tokenizer = load_for_inference(None, str(TOY))
    profile_set = tokenize_sft(
        tokenizer, to_prompt_answer(toy.test_records(toy.DOWNSTREAM_TASK, 100)), max_length=toy.MAX_LENGTH
    )
    with torch.no_grad():
        base_profile = noise_profile(base_model, profile_set, TS, batch_size=50).tolist()
    before = next(iter(results.values()))["accuracy_before"][:1]  # greedy sampling: the same for every run
    results = {BASE: {"accuracy": before, "trainable_parameters": 0, "profile": base_profile}, **results}
    (out / "quality_text.json").write_text(json.dumps({"ts": TS, "seeds": seeds, "results": results}, indent=1))
    plot = plot_noise_profiles(
        TS,
        {label: r["profile"] for label, r in results.items()},
        out / "quality_text_profile.png",
        baseline=BASE,
        title="Toy LLaDA, 'What is a&b?' test problems: loss by noise level",
    )
    return _text_table(results, seeds, plot)


def _profile_of(folder: Path, adapter: str, dataset) -> list[float]:
    if adapter == "full":
        model, _ = load_for_inference(str(folder))
    else:
        base, _ = load_for_inference(None, str(TOY))
        model = load_adapter(base, folder).eval()
    with torch.no_grad():
        return noise_profile(model, dataset, TS, batch_size=50).tolist()


def _mean_std(xs: list[float]) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.fmean(xs):.1f} ± {100 * std:.1f}"


def _text_table(results: dict[str, dict], seeds: list[int], plot: Path) -> str:
    header = ["method", "trainable params", "accuracy % (mean ± std)", "per seed", "loss t=0.1", "t=0.5", "t=1.0"]
    rows = []
    for label, r in results.items():
        prof = r["profile"]
        rows.append(
            [
                label,
                f"{r['trainable_parameters']:,}",
                _mean_std(r["accuracy"]),
                " / ".join(f"{100 * a:.0f}" for a in r["accuracy"]),
                f"{prof[TS.index(0.1)]:.3f}",
                f"{prof[TS.index(0.5)]:.3f}",
                f"{prof[TS.index(1.0)]:.3f}",
            ]
        )
    return _timing.markdown_table(header, rows) + f"\n\nseeds {seeds}; noise profile plot: `{plot.name}`\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("text", "image"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the tables")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--methods", default=None, help="text: comma-separated labels to run (default: all), then the table if complete"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(_timing.machine_line(torch.device("cpu")))
    if args.task == "text":
        labels = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
        unknown = sorted(set(labels) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
        for label in labels:
            run_method(label, args.seeds, args.output_dir)
        if not all((args.output_dir / "quality_text_runs" / f"{_slug(m)}.json").is_file() for m in METHODS):
            return
        table = text_table(args.seeds, args.output_dir)
    else:
        import quality_image

        table = quality_image.run(args.seeds, args.output_dir)
    (args.output_dir / f"quality_{args.task}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
