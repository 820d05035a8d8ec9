"""Generate answers with a masked diffusion LM (LLaDA or Dream) and an optional NaRA / LoRA / noise-bin adapter.

    python examples/llada/generate.py --adapter_path outputs/run/final --prompt "What is 12 + 30?"
    python examples/llada/generate.py --model GSAI-ML/LLaDA-8B-Instruct --prompt "..." --gen_length 256 --steps 256 \\
        --block_length 8 --dtype bfloat16
    python examples/llada/generate.py --model Dream-org/Dream-v0-Instruct-7B --prompt "..." --gen_length 256 \\
        --alg entropy --temperature 0.2 --top_p 0.95 --dtype bfloat16

The family (read from the model's config) brings its sampler: Dream samples in one block with its timesteps schedule
and ``--alg`` (= ``--remasking``) entropy unless told otherwise; ``--alg_temp``, ``--top_p``, ``--top_k`` and ``--eps``
are Dream's options (`nara_diffusion.text.unmasking`).

Prompts are rendered with the tokenizer's chat template (as in training). All logic is in
`nara_diffusion.text.generate`, `nara_diffusion.text.prompting` and `nara_diffusion.text.loading`.
"""

import argparse
import logging
from typing import Optional

import torch

from nara_diffusion.text.data import encode_prompts
from nara_diffusion.text.loading import load_for_inference
from nara_diffusion.text.model_info import model_family
from nara_diffusion.text.prompting import generate_texts
from nara_diffusion.text.sampler import CACHE_MODES, NOISE_RULES, REMASKING, SCHEDULES
from nara_diffusion.text.trained_sampling import sampler_settings


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The `generate` settings as command-line options (shared with evaluate.py)."""
    group = parser.add_argument_group("sampler")
    group.add_argument(
        "--gen_length",
        type=int,
        default=None,
        help="tokens to generate (default: the length the adapter was trained for, its sampling.json; else 64)",
    )
    group.add_argument("--steps", type=int, default=None, help="reverse steps in all (default: gen_length)")
    group.add_argument(
        "--block_length",
        type=int,
        default=None,
        help="semi-autoregressive block size (default: one block at the trained length; else 8)",
    )
    group.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    group.add_argument("--cfg_scale", type=float, default=0.0, help="unsupervised classifier-free guidance")
    group.add_argument(
        "--remasking",
        "--alg",
        choices=REMASKING,
        default=None,
        help="which masked positions a step reveals (Dream's --alg; default: the family's, LLaDA low_confidence, "
        "Dream entropy)",
    )
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="how many positions each step reveals (default: the family's, LLaDA linear, Dream timesteps)",
    )
    group.add_argument("--eps", type=float, default=1e-3, help="final time of the timesteps schedule (Dream's eps)")
    group.add_argument(
        "--alg_temp", type=float, default=None, help="Dream: draw the revealed positions at this temperature"
    )
    group.add_argument("--top_p", type=float, default=None, help="Dream's algorithms: nucleus cut of the logits")
    group.add_argument("--top_k", type=int, default=None, help="Dream's algorithms: top-k cut of the logits")
    group.add_argument("--noise_rule", choices=NOISE_RULES, default="generation", help="λ for NaRA adapters")
    group.add_argument("--till_eos", choices=("auto", "true", "false"), default="auto", help="auto: on for NaRA")
    group.add_argument("--threshold", type=float, default=None, help="confidence-threshold parallel decoding")
    group.add_argument(
        "--cache",
        choices=("none", *CACHE_MODES),
        default="none",
        help="block-wise K/V cache (Fast-dLLM): prefix (prompt and finished blocks) or dual (also the suffix)",
    )
    group.add_argument("--batch_size", type=int, default=8, help="prompts per sampler batch")
    group.add_argument("--seed", type=int, default=0, help="seed of the sampler's randomness")


#: The sampler's length settings for a model whose adapter folder has no sampling.json (Dream: one block, as its own
#: sampler has no blocks).
FALLBACK = {"gen_length": 64, "block_length": 8}


def sampler_kwargs(args: argparse.Namespace, model: torch.nn.Module, default_length: Optional[int] = None) -> dict:
    """`generate` keyword arguments from the parsed options; lengths not given are the ones ``model``'s adapter was
    trained for (`sampler_settings`), else ``default_length`` in one block, else `FALLBACK`."""
    lengths = {"gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length}
    fallback = FALLBACK if default_length is None else {"gen_length": default_length, "block_length": default_length}
    if model_family(model) == "Dream" and default_length is None:
        fallback = {"gen_length": FALLBACK["gen_length"]}
    return {
        **sampler_settings(model, lengths, fallback=fallback),
        "temperature": args.temperature,
        "cfg_scale": args.cfg_scale,
        "remasking": args.remasking,
        "noise_rule": args.noise_rule,
        "till_eos": {"auto": None, "true": True, "false": False}[args.till_eos],
        "threshold": args.threshold,
        "cache": None if args.cache == "none" else args.cache,
        "schedule": args.schedule,
        "eps": args.eps,
        "alg_temp": args.alg_temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "generator": torch.Generator().manual_seed(args.seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        "--pretrained_model_name_or_path",
        default=None,
        help="base model, Hub id or folder (default: the one the adapter folder records)",
    )
    parser.add_argument("--adapter_path", default=None, help="adapter folder or noise-bin set (default: no adapter)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="base weights")
    add_sampler_arguments(parser)
    args = parser.parse_args()

    model, tokenizer = load_for_inference(args.adapter_path, args.model, args.dtype)
    if torch.cuda.is_available():
        model.cuda()
    prompts = encode_prompts(tokenizer, args.prompt)
    texts = generate_texts(model, tokenizer, prompts, batch_size=args.batch_size, **sampler_kwargs(args, model))
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f">>> {prompt}\n{text}\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
