"""Evaluate masked diffusion LMs with adapters: accuracy of generated answers, or the noise-level loss profile.

Accuracy (prints it; writes ``<output_dir>/predictions.<label>.jsonl`` per model, one JSON line per example with
prompt, gold, prediction, extracted answer, correct):

    python examples/llada/evaluate.py --adapter_path outputs/run/final --test_dataset test.json --test_kind math
    python examples/llada/evaluate.py --adapter_path out/nara/final --adapter_path out/lora/final --include_base \
        --test_dataset gsm8k_test.json --gen_length 256 --block_length 8 --output_dir eval/
    python examples/llada/evaluate.py --adapter_path out/dream-nara/final --test_dataset gsm8k_test.json \
        --gen_length 256 --alg entropy --output_dir eval/          # a Dream adapter: Dream's sampler (see generate.py)

Noise-level loss profile (the masked-diffusion loss at fixed noise levels t, the same masks for every model; the
base model's curve is always drawn, then each adapter's, with their loss reduction relative to the base; written
to ``<output_dir>/noise_profile.png`` and ``.json``):

    python examples/llada/evaluate.py --profile --adapter_path out/nara/final --adapter_path out/lora/final \
        --test_dataset val.json --output_dir eval/

``--adapter_path`` is an adapter folder (or noise-bin set) and may be repeated; each model is labelled by its run
(``out/nara/final`` -> ``nara``). With no ``--adapter_path``, or with ``--include_base``, the bare base model is
evaluated too; it defaults to the one the first adapter folder records. ``--test_dataset`` is a JSON/JSONL file or
a ``datasets`` name in any schema the fine-tuning data accepts (LLM-Adapters test files carry the gold in
``answer``).
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from generate import add_sampler_arguments, sampler_kwargs
from transformers import AutoTokenizer

from nara_diffusion.text.data import load_records, to_prompt_answer, tokenize_sft
from nara_diffusion.text.loading import adapter_base_model, load_adapter, load_for_inference
from nara_diffusion.text.noise_profile import compare_noise_profiles, plot_noise_profiles
from nara_diffusion.text.scoring import ANSWER_KINDS, evaluate_generation
from nara_diffusion.text.trained_sampling import read_sampling_record

BASE = "base"
PROFILE_NAME = "noise_profile.png"


def label_adapters(paths: list[str], include_base: bool) -> dict[str, str | None]:
    """Label -> adapter folder (None for the bare base model, first when included or when there is no folder).

    A folder's label is its run: the parent's name for ``.../<run>/final`` or ``.../<run>/best``, else its own.
    """
    adapters: dict[str, str | None] = {BASE: None} if include_base or not paths else {}
    for path in paths:
        folder = Path(path)
        label = folder.parent.name if folder.name in ("final", "best") else folder.name
        if label in adapters:
            raise SystemExit(f"Two models would be labelled {label!r}; give the adapter folders distinct run names.")
        adapters[label] = path
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--test_dataset", required=True, help="test (or validation) records: file or datasets name")
    parser.add_argument("--adapter_path", action="append", default=[], help="adapter folder; repeatable")
    parser.add_argument("--include_base", action="store_true", help="also evaluate the bare base model")
    parser.add_argument(
        "--model",
        "--pretrained_model_name_or_path",
        default=None,
        help="base model, Hub id or folder (default: the one the first adapter folder records)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="base weights")
    parser.add_argument("--test_size", type=int, default=None, help="use the first N records only (default: all)")
    parser.add_argument("--prompt_column", default=None, help="column of the prompt (default: guessed)")
    parser.add_argument("--answer_column", default=None, help="column of the answer (default: guessed)")
    parser.add_argument("--output_dir", type=Path, default=Path("."), help="folder of the predictions and plots")
    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--test_kind", choices=ANSWER_KINDS, default="auto", help="answer format")
    accuracy.add_argument("--gold_column", default=None, help="default: 'answer' if present, else the answer column")
    profile = parser.add_argument_group("noise profile")
    profile.add_argument("--profile", action="store_true", help="draw the noise-level loss profile instead")
    profile.add_argument("--ts", default="0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", help="noise levels")
    profile.add_argument("--max_length", type=int, default=512, help="SFT sequence length for the profile")
    add_sampler_arguments(parser)
    args = parser.parse_args()

    adapters = label_adapters(args.adapter_path, args.include_base)
    paths = [p for p in adapters.values() if p is not None]
    base_name = args.model or (adapter_base_model(paths[0]) if paths else None)
    if base_name is None:
        parser.error("give --model, or an --adapter_path folder that records its base model")
    base, tokenizer = load_for_inference(None, base_name, args.dtype)
    if paths and (Path(paths[0]) / "tokenizer_config.json").is_file():  # the tokenizer saved with the adapter
        tokenizer = AutoTokenizer.from_pretrained(paths[0])
    if torch.cuda.is_available():
        base.cuda()
    records = load_records(args.test_dataset)[: args.test_size]
    args.output_dir.mkdir(parents=True, exist_ok=True)

    if args.profile:
        ts = [float(t) for t in args.ts.split(",") if t.strip()]
        pairs = to_prompt_answer(records, prompt_column=args.prompt_column, answer_column=args.answer_column)
        dataset = tokenize_sft(tokenizer, pairs, max_length=args.max_length)
        named = {label: path for label, path in adapters.items() if path is not None}
        profiles = compare_noise_profiles(base, named, dataset, ts, batch_size=args.batch_size, seed=args.seed)
        print("t       " + "".join(f"{label:>14}" for label in profiles))
        for i, t in enumerate(ts):
            print(f"{t:<8.3f}" + "".join(f"{float(v[i]):>14.4f}" for v in profiles.values()))
        plot = plot_noise_profiles(ts, {k: v.tolist() for k, v in profiles.items()}, args.output_dir / PROFILE_NAME)
        Path(plot).with_suffix(".json").write_text(
            json.dumps({"ts": ts, "losses": {k: v.tolist() for k, v in profiles.items()}}, indent=1)
        )
        print(f"plot: {plot}")
        return

    # The bare base model samples at the first adapter's trained length, so that both see the same canvas.
    trained = next((r for r in map(read_sampling_record, paths) if r is not None), None)
    base_length = None if trained is None else int(trained["gen_length"])
    for label, path in adapters.items():
        model = base if path is None else load_adapter(base, path).eval()
        result = evaluate_generation(
            model,
            tokenizer,
            records,
            kind=args.test_kind,
            gold_column=args.gold_column,
            prompt_column=args.prompt_column,
            answer_column=args.answer_column,
            batch_size=args.batch_size,
            progress=True,
            **sampler_kwargs(args, model, base_length if path is None else None),
        )
        target = args.output_dir / f"predictions.{label}.jsonl"
        result.write_jsonl(target)
        print(f"{label}: accuracy {result.accuracy:.4f} ({result.correct}/{result.total}); predictions in {target}")
        if path is not None:
            base = model.unload()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
