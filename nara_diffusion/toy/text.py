"""The toy text world: a character-level chat tokenizer, generated arithmetic tasks with exact answers, and the
small LLaDA configuration that is pretrained on them (``examples/llada/make_toy_base.py``).

Tasks (each a prompt/answer pair in the LLM-Adapters schema, so the real data path reads them), all on two-digit
numbers 10–99:

- ``add``: "What is 63+45?" → "108";
- ``sub``: "What is 63-45?" → "18" (a ≥ b: no negative numbers);
- ``word``: one-step word problems, adding or taking away ("Mia has 23 pens and gets 45. How many now?" → "68");
- ``amp``: "What is 63&45?" → "18" — the downstream task: a notation the toy base never sees, "&" for subtraction
  (a ≥ b). The operands sit where they sit in ``sub``, so what is new is the notation alone; the base reads the
  unknown symbol as "+" (92.5% of held-out "&" problems answered as sums), so it starts near 0%. Two rejected
  candidates: "&" for addition (the base already solves it) and "What is the sum of 63 and 45?" (moving the
  operands: a 41k-parameter adapter reached ≤ 20% exact answers in 300–900 updates, a poor demonstration).

The quality benchmark's tasks (`BENCHMARK_TASKS`), chosen so that the base scores 0% and no method saturates at the
benchmark's budget (300 updates of 16; NaRA at 5e-3 measured on 200 validation problems):

- ``dif``: "What is 32~42?" → "10" — the absolute difference, operands in either order: compare, then subtract (the
  base only subtracts the smaller from the larger when it comes second), from 1,000 training problems: 15%;
- ``dlr``: "What is 63$45?" → "18" — one more new notation for subtraction, from only `BENCHMARK_TRAIN_SIZE` = 40
  training problems: 54% (at 1e-2: 23%; from 32 problems: 13%; from 64: 93–97%, nearly saturated).

Rejected: "What is 12+34+56?" and "What is 63&45+12?" (three operands: 0.5% after 300 updates, nothing to compare)
and "What is 63#45?" for a + b + 1 (99.5%: saturates). Each benchmark task has `VALIDATION_SIZE` validation problems
(for choosing a learning rate) beside its `BENCHMARK_TEST_SIZE` test problems; both are held out of every training
draw.

Held-out problems are fixed once for all (a seeded choice of operand pairs per task, `HOLDOUT_SEED`), so the base
model's test prompts never appear in its pretraining corpus and the downstream test prompts never appear in the
downstream training file.
"""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from ..text.llada import LLaDAConfig
from ..text.scoring import GenerationEval, evaluate_generation

SPECIAL_TOKENS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# LLaDA-Instruct's Llama-3-style template, reduced to what a toy model needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

PRETRAIN_TASKS = ("add", "sub", "word")
DOWNSTREAM_TASK = "amp"
BENCHMARK_TASKS = ("dif", "dlr")
TASKS = (*PRETRAIN_TASKS, DOWNSTREAM_TASK, *BENCHMARK_TASKS)
OPERANDS = range(10, 100)
HOLDOUT_SEED = 20261122
#: Test problems of each benchmark task (the first ones held out) and validation problems (the next ones).
BENCHMARK_TEST_SIZE, VALIDATION_SIZE = 500, 200
#: Training problems of each benchmark task (``dlr`` is the few-example task).
BENCHMARK_TRAIN_SIZE = {"dif": 1000, "dlr": 40}
#: Held-out problems per task (never trained on: the base model's test sets, the downstream task's, and the benchmark
#: tasks' test and validation problems).
HOLDOUT_SIZE = {"add": 400, "sub": 300, "word": 300, "amp": 400}
HOLDOUT_SIZE |= {task: BENCHMARK_TEST_SIZE + VALIDATION_SIZE for task in BENCHMARK_TASKS}
#: Sequence length of the toy SFT examples (the longest word problem + answer + EOS is 72 tokens).
MAX_LENGTH = 72
#: Settings of the toy fine-tunes (the example's embedded default run and the quality benchmark). At r = 8 on
#: q/k/v/attn_out with a (32, 64) hypernetwork NaRA trains 41,120 parameters; peft LoRA at r = 10 trains 40,960.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "adapter": "nara",
    "r": 8,
    "hidden_dims": [32, 64],
    "lora_dropout": 0.0,
    "learning_rate": 5e-3,
    "batch_size": 16,
    "grad_accum": 1,
    "max_steps": 300,
    "max_length": MAX_LENGTH,
    "val_size": 0,
    "eval_every": 0,
    "report_to": "none",
}
#: The embedded default run's gentler schedule (overrides FINETUNE_DEFAULTS): at 5e-3 × 300 updates the outcome of one
#: run is chaotic (same seed: 54%, 39%, 33%, 4%); at 2e-3 × 600 it was 36%, 36%, 38% (two threads) and 41% (one).
DEMO_SCHEDULE: dict[str, Any] = {"learning_rate": 2e-3, "max_steps": 600}
#: Sampler settings of the toy base model's held-out scores (`score_tasks`, the base's model card): answers have at
#: most 3 digits, so 8 tokens in one block, one token per step. Not for adapters fine-tuned at `MAX_LENGTH`: they
#: were trained to fill every answer position up to it (see `DEMO_SAMPLER`).
SAMPLER = {"gen_length": 8, "steps": 8, "block_length": 8}
#: Test-sampler settings of the embedded demo run (`FinetuneConfig` fields): none for the length and block, so the
#: test samples the 35 answer positions the adapter is trained to fill ("What is 63&45?" is a 37-token prompt at
#: `MAX_LENGTH` 72), in one block, one token per step.
DEMO_SAMPLER: dict[str, Any] = {"test_gen_length": None, "test_steps": None, "test_block_length": None}

_NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max")
_ITEMS = ("pens", "cups", "eggs", "hats", "keys", "toys")
_MORE = ("gets", "finds", "buys")
_LESS = ("gives", "loses", "sells")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus LLaDA's special tokens and a chat template."""
    chars = sorted(set(string.printable) - {"\x0b", "\x0c"})
    vocab = {c: i for i, c in enumerate(["<unk>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llada_config(
    tokenizer: PreTrainedTokenizerFast, *, d_model: int = 128, n_layers: int = 4, n_heads: int = 4
) -> LLaDAConfig:
    """A small LLaDA (our native class) sized for ``tokenizer``: SwiGLU MLP 3·d, RoPE, no biases, tied to nothing."""
    return LLaDAConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        n_layers=n_layers,
        mlp_hidden_size=3 * d_model,
        vocab_size=len(tokenizer),
        embedding_size=len(tokenizer),
        max_sequence_length=256,
        rope_theta=10000.0,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# -- problems ---------------------------------------------------------------------------------------------------------
@functools.cache
def _operands(task: str) -> tuple[tuple[int, int], ...]:
    """Every operand pair of a task, in a fixed order."""
    if task in ("sub", "amp", "dlr"):
        return tuple((a, b) for a in OPERANDS for b in OPERANDS if b <= a)
    return tuple((a, b) for a in OPERANDS for b in OPERANDS)


def _word_problem(a: int, b: int, rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if b <= a and rng.random() < 0.5:
        verb, answer = rng.choice(_LESS), a - b
    else:
        verb, answer = rng.choice(_MORE), a + b
    return f"{name} has {a} {item} and {verb} {b}. How many now?", answer


def make_problem(task: str, a: int, b: int, rng: random.Random) -> dict[str, Any]:
    """One problem as an LLM-Adapters record (``instruction``, ``input``, ``output``, ``answer``)."""
    if task == "dif":
        prompt, answer = f"What is {a}~{b}?", abs(a - b)
    elif task == "dlr":
        prompt, answer = f"What is {a}${b}?", a - b
    elif task == "add":
        prompt, answer = f"What is {a}+{b}?", a + b
    elif task == "sub":
        prompt, answer = f"What is {a}-{b}?", a - b
    elif task == "word":
        prompt, answer = _word_problem(a, b, rng)
    elif task == "amp":
        prompt, answer = f"What is {a}&{b}?", a - b
    else:
        raise ValueError(f"Unknown toy task {task!r}; choose one of {', '.join(TASKS)}.")
    return {"instruction": prompt, "input": "", "output": str(answer), "answer": str(answer), "task": task}


def split_operands(task: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(train, held_out)`` operand pairs of a task; the held-out ones are fixed by `HOLDOUT_SEED` and come in a
    shuffled order (so that the first ``n`` are a fair sample)."""
    if task not in TASKS:
        raise ValueError(f"Unknown toy task {task!r}; choose one of {', '.join(TASKS)}.")
    train, held = _split(task)
    return list(train), list(held)


@functools.cache
def _split(task: str) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    pairs = _operands(task)
    order = list(range(len(pairs)))
    random.Random(f"{HOLDOUT_SEED}-{task}").shuffle(order)
    held = set(order[: HOLDOUT_SIZE[task]])
    return tuple(p for i, p in enumerate(pairs) if i not in held), tuple(pairs[i] for i in order[: HOLDOUT_SIZE[task]])


def _held_out_records(task: str) -> list[dict[str, Any]]:
    rng = random.Random(f"{HOLDOUT_SEED}-{task}-text")
    return [make_problem(task, a, b, rng) for a, b in split_operands(task)[1]]


def test_records(task: str, n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` test problems of a task (all of them by default), always the same ones: every held-out problem,
    or for a benchmark task the first `BENCHMARK_TEST_SIZE`."""
    records = _held_out_records(task)
    if task in BENCHMARK_TASKS:
        records = records[:BENCHMARK_TEST_SIZE]
    return records if n is None else records[:n]


def validation_records(task: str, n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` validation problems of a benchmark task (`VALIDATION_SIZE` by default): held out of training and
    disjoint from its test problems, for choosing settings such as the learning rate."""
    if task not in BENCHMARK_TASKS:
        raise ValueError(f"Only the benchmark tasks {BENCHMARK_TASKS} have a validation split, not {task!r}.")
    records = _held_out_records(task)[BENCHMARK_TEST_SIZE:]
    return records if n is None else records[:n]


def train_records(tasks: Sequence[str], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` training problems spread evenly over ``tasks``, shuffled.

    Each task's problems are drawn without replacement from its non-held-out operand pairs, cycling through a
    fresh permutation when more are asked for than it has.
    """
    rng = random.Random(seed)
    records = []
    for k, task in enumerate(tasks):
        count = n // len(tasks) + (k < n % len(tasks))
        pool = split_operands(task)[0]
        pairs: list[tuple[int, int]] = []
        while len(pairs) < count:
            pairs += rng.sample(pool, min(len(pool), count - len(pairs)))
        records += [make_problem(task, a, b, rng) for a, b in pairs]
    rng.shuffle(records)
    return records


def score_tasks(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], n: int | None = None, *, batch_size: int = 50
) -> dict[str, GenerationEval]:
    """Exact-answer accuracy on each task's held-out problems (the first ``n``), with the noise-aware sampler at the
    toy `SAMPLER` settings (greedy, low-confidence remasking)."""
    return {
        task: evaluate_generation(
            model, tokenizer, test_records(task, n), kind="exact", batch_size=batch_size, **SAMPLER
        )
        for task in tasks
    }


def model_card(report: dict[str, Any]) -> str:
    """The README of the toy base folder, from the pretraining script's report."""
    rows = "\n".join(
        f"| `{task}` | {acc:.1%} | {report['held_out_problems'][task]} |"
        for task, acc in report["held_out_accuracy"].items()
    )
    return f"""# Toy LLaDA

A small `LLaDAModelLM` (nara-diffusion's native LLaDA) with a character-level chat tokenizer, pretrained from
scratch with the masked-diffusion objective on generated arithmetic (`nara_diffusion.toy.text`: addition and
subtraction of two-digit numbers, one-step word problems). It exists so that fine-tuning, sampling and the quality
benchmark run anywhere; real runs use `GSAI-ML/LLaDA-8B-Instruct`.

Made with `{report["command"]}` on a CPU ({report["minutes"]}).

Held-out accuracy (exact answer, noise-aware sampler, {report["sampler"]}); `{DOWNSTREAM_TASK}` is the downstream
task the base model was never taught:

| task | accuracy | problems |
|---|---|---|
{rows}
"""


__all__ = [
    "BENCHMARK_TASKS",
    "BENCHMARK_TEST_SIZE",
    "BENCHMARK_TRAIN_SIZE",
    "CHAT_TEMPLATE",
    "DEMO_SAMPLER",
    "DEMO_SCHEDULE",
    "DOWNSTREAM_TASK",
    "FINETUNE_DEFAULTS",
    "MAX_LENGTH",
    "OPERANDS",
    "PRETRAIN_TASKS",
    "SAMPLER",
    "SPECIAL_TOKENS",
    "TASKS",
    "VALIDATION_SIZE",
    "char_tokenizer",
    "llada_config",
    "make_problem",
    "model_card",
    "score_tasks",
    "split_operands",
    "test_records",
    "train_records",
    "validation_records",
]
