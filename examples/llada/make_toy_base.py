"""Pretrain the toy LLaDA (``examples/llada/toy/``): a small LLaDAModelLM that does arithmetic, from scratch, on a CPU.

    python examples/llada/make_toy_base.py examples/llada/toy

Builds the character-level chat tokenizer and a randomly initialised 4-layer LLaDA (seeded), generates a corpus of
addition, subtraction and word problems (`nara_diffusion.toy.text`; held-out problems never enter it), trains every
weight with the masked-diffusion objective in its SFT form (prompt kept, answer + EOS padding masked at ratio
t ~ U(ε, 1)) through the same `run_finetune` as any fine-tune, and writes the model, the tokenizer, ``scores.json``
(held-out accuracy per task with the noise-aware sampler, and the downstream task's, which it should not solve) and a
model card. Two phases of the same recipe, each with its own corpus (seeds ``seed`` and ``seed + 1``) and its own
warm-up and linear decay: 6,000 then 8,000 updates of 64 problems (a single 6,000-update run stopped short of
exact arithmetic); about 38 minutes with one thread, then 27 with two, on a 2-core CPU. A ``--work_dir`` that
holds a finished phase 1 goes on with phase 2.

ε is 0.2 here rather than LLaDA's 0.001: the 1/t weight of the ELBO lets rare low-t samples dominate the gradient
noise of a from-scratch run (after 900 updates on addition alone, the answer's cross-entropy at t = 1 was 0.37 with
ε = 0.2 against 0.99 with ε = 0.001).
"""

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nara_diffusion.text import FinetuneConfig, LLaDAModelLM, load_for_inference, run_finetune
from nara_diffusion.toy import text as toy
from nara_diffusion.training import TrainResult


def _phase(args: argparse.Namespace, model: Path, work: Path, name: str, steps: int, seed: int) -> FinetuneConfig:
    """One training phase: every weight, a fresh corpus drawn with ``seed``, linear warm-up and decay over ``steps``."""
    corpus = work / f"{name}_corpus.json" if name != "run" else work / "corpus.json"
    corpus.write_text(json.dumps(toy.train_records(toy.PRETRAIN_TASKS, args.corpus_size, seed=seed)))
    return FinetuneConfig(
        model=str(model),
        dataset=str(corpus),
        adapter="full",
        max_length=toy.MAX_LENGTH,
        val_size=512,
        learning_rate=args.learning_rate,
        mask_eps=args.mask_eps,
        batch_size=args.batch_size,
        grad_accum=1,
        max_steps=steps,
        eval_every=1000,
        output_dir=str(work / name),
        seed=seed,
        report_to="none",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the model (Hub layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000, help="optimizer updates of phase 1")
    parser.add_argument("--steps2", type=int, default=8000, help="optimizer updates of phase 2 (0: none)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--mask_eps", type=float, default=0.2, help="t ~ U(mask_eps, 1)")
    parser.add_argument("--corpus_size", type=int, default=60000, help="distinct training problems")
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--work_dir", type=Path, default=None, help="keep the run (checkpoints, logs) here")
    args = parser.parse_args()

    start = time.time()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="toy-llada-"))
    if (work / "run" / "final").is_dir():  # phase 1 finished in an earlier call with this work_dir
        logging.info("phase 1 already done in %s; going on from its final weights", work)
        result = TrainResult(args.steps, None, work / "run" / "final", None)
    else:
        tokenizer = toy.char_tokenizer()
        torch.manual_seed(args.seed)
        init = work / "init"
        LLaDAModelLM(toy.llada_config(tokenizer, d_model=args.d_model, n_layers=args.n_layers)).save_pretrained(init)
        tokenizer.save_pretrained(init)
        result = run_finetune(_phase(args, init, work, "run", args.steps, args.seed))
    if args.steps2:
        result = run_finetune(_phase(args, result.final_dir, work, "run2", args.steps2, args.seed + 1))

    model, tokenizer = load_for_inference(str(result.final_dir))
    scores = toy.score_tasks(model, tokenizer, (*toy.PRETRAIN_TASKS, toy.DOWNSTREAM_TASK))
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(result.final_dir / name, args.out / name)
    tokenizer.save_pretrained(args.out)
    minutes = (time.time() - start) / 60
    report = {
        "held_out_accuracy": {task: round(s.accuracy, 4) for task, s in scores.items()},
        "held_out_problems": {task: s.total for task, s in scores.items()},
        "sampler": toy.SAMPLER,
        "best_val_loss": result.best_val_loss,
        "command": (
            f"python examples/llada/make_toy_base.py {args.out} --seed {args.seed} --steps {args.steps} "
            f"--steps2 {args.steps2}"
        ),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "minutes": f"{minutes:.1f} min",
    }
    (args.out / "scores.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "README.md").write_text(toy.model_card(report))
    for task, s in scores.items():
        print(f"{task:>6}: {s.accuracy:.1%} of {s.total} held-out problems")
    print(f"toy LLaDA written to {args.out} in {minutes:.1f} min")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    main()
