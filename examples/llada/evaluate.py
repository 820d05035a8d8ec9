"""Evaluate masked diffusion LMs with adapters: accuracy of generated answers, or the noise-level loss profile.

Accuracy (prints it; writes one JSON line per example with prompt, gold, prediction, extracted answer, correct):

    python examples/llada/evaluate.py --adapter outputs/run/final --data test.json --kind math
    python examples/llada/evaluate.py --adapter nara=out/nara/final --adapter lora=out/lora/final --adapter base \\
        --data gsm8k_test.json --gen_length 256 --block_length 8 --output preds.jsonl

Noise-level loss profile (the masked-diffusion loss at fixed noise levels t, the same masks for every model; the
base model's curve is always drawn, then each adapter's, with their loss reduction relative to the base):

    python examples/llada/evaluate.py --profile --adapter nara=out/nara/final --adapter lora=out/lora/final \\
        --data val.json --plot noise_profile.png

``--adapter`` takes ``PATH`` or ``LABEL=PATH`` (``base`` alone is the bare base model) and may be repeated; the base
model defaults to the one the first adapter records. ``--data`` is a JSON/JSONL file or a ``datasets`` name in any
schema the fine-tuning data accepts (LLM-Adapters test files carry the gold in ``answer``).
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from generate import add_sampler_arguments, sampler_kwargs
from transformers import AutoTokenizer

from nara_diffusion.text.data import load_records, to_prompt_answer, tokenize_sft
from nara_diffusion.text.evaluation import (
    ANSWER_KINDS,
    adapter_base_model,
    compare_noise_profiles,
    evaluate_generation,
    load_adapter,
    load_for_inference,
    plot_noise_profiles,
)

BASE = "base"


def parse_adapters(values: list[str]) -> dict[str, str | None]:
    """``PATH`` / ``LABEL=PATH`` / ``base`` → label → path (None for the bare base model)."""
    adapters: dict[str, str | None] = {}
    for value in values or [BASE]:
        label, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        if path in (BASE, "none"):
            adapters[label or BASE] = None
        else:
            folder = Path(path)  # default label: the run folder for .../<run>/final or .../<run>/best
            adapters[label or (folder.parent.name if folder.name in ("final", "best") else folder.name)] = path
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="test (or validation) records")
    parser.add_argument("--adapter", action="append", default=[], help="[LABEL=]PATH, or 'base'; repeatable")
    parser.add_argument("--model", default=None, help="base model (default: the one the first adapter records)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--limit", type=int, default=None, help="use the first N records only")
    parser.add_argument("--prompt_column", default=None)
    parser.add_argument("--answer_column", default=None)
    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--kind", choices=ANSWER_KINDS, default="auto", help="answer format")
    accuracy.add_argument("--gold_column", default=None, help="default: 'answer' if present, else the answer column")
    accuracy.add_argument("--output", default="predictions.jsonl", help="per-example predictions (one file per model)")
    profile = parser.add_argument_group("noise profile")
    profile.add_argument("--profile", action="store_true", help="draw the noise-level loss profile instead")
    profile.add_argument("--ts", default="0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", help="noise levels")
    profile.add_argument("--max_length", type=int, default=512, help="SFT sequence length for the profile")
    profile.add_argument("--plot", default="noise_profile.png", help="PNG of the curves")
    add_sampler_arguments(parser)
    args = parser.parse_args()

    adapters = parse_adapters(args.adapter)
    paths = [p for p in adapters.values() if p is not None]
    base_name = args.model or (adapter_base_model(paths[0]) if paths else None)
    if base_name is None:
        parser.error("give --model, or an --adapter folder that records its base model")
    base, tokenizer = load_for_inference(None, base_name, args.dtype)
    if paths and (Path(paths[0]) / "tokenizer_config.json").is_file():  # the tokenizer saved with the adapter
        tokenizer = AutoTokenizer.from_pretrained(paths[0])
    if torch.cuda.is_available():
        base.cuda()
    records = load_records(args.data)[: args.limit]

    if args.profile:
        ts = [float(t) for t in args.ts.split(",") if t.strip()]
        pairs = to_prompt_answer(records, prompt_column=args.prompt_column, answer_column=args.answer_column)
        dataset = tokenize_sft(tokenizer, pairs, max_length=args.max_length)
        named = {label: path for label, path in adapters.items() if path is not None}
        profiles = compare_noise_profiles(base, named, dataset, ts, batch_size=args.batch_size, seed=args.seed)
        print("t       " + "".join(f"{label:>14}" for label in profiles))
        for i, t in enumerate(ts):
            print(f"{t:<8.3f}" + "".join(f"{float(v[i]):>14.4f}" for v in profiles.values()))
        plot = plot_noise_profiles(ts, {k: v.tolist() for k, v in profiles.items()}, args.plot)
        Path(plot).with_suffix(".json").write_text(
            json.dumps({"ts": ts, "losses": {k: v.tolist() for k, v in profiles.items()}}, indent=1)
        )
        print(f"plot: {plot}")
        return

    output = Path(args.output)
    for label, path in adapters.items():
        model = base if path is None else load_adapter(base, path).eval()
        result = evaluate_generation(
            model,
            tokenizer,
            records,
            kind=args.kind,
            gold_column=args.gold_column,
            prompt_column=args.prompt_column,
            answer_column=args.answer_column,
            batch_size=args.batch_size,
            progress=True,
            **sampler_kwargs(args),
        )
        target = output if len(adapters) == 1 else output.with_name(f"{output.stem}.{label}{output.suffix}")
        result.write_jsonl(target)
        print(f"{label}: accuracy {result.accuracy:.4f} ({result.correct}/{result.total}); predictions in {target}")
        if path is not None:
            base = model.unload()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
