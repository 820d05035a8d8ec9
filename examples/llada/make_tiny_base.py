"""Write a tiny random LLaDA (our native class) and a character-level chat tokenizer to a folder.

It knows nothing (random weights): it exists so that the fine-tuning command runs end to end in seconds on a CPU,
e.g. in tests and smoke runs. ``examples/llada/toy/`` is the pretrained toy base (make_toy_base.py); real runs use
``GSAI-ML/LLaDA-8B-Instruct``.

    python examples/llada/make_tiny_base.py outputs/tiny-llada
"""

import argparse

import torch

from nara_diffusion.text.llada import LLaDAConfig, LLaDAModelLM
from nara_diffusion.toy.text import char_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tok = char_tokenizer()
    vocab = len(tok)
    config = LLaDAConfig(
        d_model=args.d_model,
        n_heads=4,
        n_kv_heads=4,
        n_layers=args.n_layers,
        mlp_hidden_size=2 * args.d_model,
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=512,
        rope_theta=10000.0,
        mask_token_id=tok.mask_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    LLaDAModelLM(config).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"tiny LLaDA ({sum(p.numel() for p in LLaDAModelLM(config).parameters()):,} parameters) in {args.out}")


if __name__ == "__main__":
    main()
