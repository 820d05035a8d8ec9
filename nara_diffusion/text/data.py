"""Supervised fine-tuning data for masked diffusion LMs: records → prompt/answer pairs → padded token sequences.

Each example is laid out as LLaDA's SFT recipe wants it::

    [chat-templated prompt, generation prompt included] [answer tokens] [EOS] [EOS … EOS up to max_length]
    └────────────── prompt_length ───────────────┘ └────────── answer region (EOS padding counts) ──────────┘

The prompt is the user turn, rendered with the tokenizer's chat template and ``add_generation_prompt=True``. A
tokenizer without a chat template falls back to plain text (prompt tokens, then answer tokens) with a warning.
Examples longer than ``max_length`` are dropped and counted.

Sources: a local JSON (a list of objects) or JSONL file, or any name ``datasets.load_dataset`` accepts. Known
schemas are recognised by their columns: LLM-Adapters (``instruction``, ``input``, ``output``; math14k,
commonsense170k) and CodeFeedback (``query``, ``answer``); anything else takes ``prompt_column`` and
``answer_column``. The validation split is drawn from the raw records by seed, exactly as
``datasets.Dataset.train_test_split(test_size=val_size, seed=seed)`` draws it (the NaRA authors' 128 examples,
seed 42).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

#: Known record schemas: name → (prompt column, answer column, optional extra-input column).
SCHEMAS: dict[str, tuple[str, str, Optional[str]]] = {
    "llm_adapters": ("instruction", "output", "input"),
    "code_feedback": ("query", "answer", None),
}
LOCAL_SUFFIXES = (".json", ".jsonl")
DEFAULT_MAX_LENGTH = 512
DEFAULT_VAL_SIZE = 128
DEFAULT_SEED = 42


@dataclass(frozen=True)
class PromptAnswer:
    """One SFT pair in plain text: the user turn and the reply to learn."""

    prompt: str
    answer: str


# -- reading records ----------------------------------------------------------------------------------------------
def read_json_records(path: PathLike) -> list[dict[str, Any]]:
    """Read a local JSON file (a list of objects, or one object) or JSONL file (one object per line).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, is neither JSON nor JSONL, or holds something other than objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Dataset file {str(path)!r} does not exist; check the path (relative paths start at {os.getcwd()})."
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"Dataset file {str(path)!r} is empty; it should hold a JSON list of objects or JSONL lines.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _parse_jsonl(text, path)
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(
                f"Dataset file {str(path)!r}: record {i} is a {type(record).__name__}, not an object; every record "
                'must be an object such as {"instruction": ..., "output": ...}.'
            )
    if not records:
        raise ValueError(f"Dataset file {str(path)!r} holds no records.")
    return records


def _parse_jsonl(text: str, path: Path) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Dataset file {str(path)!r} is neither JSON nor JSONL: line {number} does not parse ({err.msg}). "
                "Give a JSON list of objects or one JSON object per line."
            ) from None
    return records


def load_records(source: PathLike, *, split: str = "train", **load_kwargs: Any) -> list[dict[str, Any]]:
    """Load raw records from a local ``.json``/``.jsonl`` file or with ``datasets.load_dataset(source, split=split)``.

    A ``source`` that exists as a file, or ends in ``.json``/``.jsonl``, is read locally (no ``datasets`` cache);
    anything else (a Hub name such as ``"m-a-p/CodeFeedback-Filtered-Instruction"``, a local dataset folder) goes
    to ``datasets.load_dataset`` with ``load_kwargs`` (e.g. ``name=`` for a configuration).
    """
    path = Path(source)
    if path.is_file() or path.suffix.lower() in LOCAL_SUFFIXES:
        return read_json_records(path)
    import datasets

    dataset = datasets.load_dataset(str(source), split=split, **load_kwargs)
    records = dataset.to_list()
    if not records:
        raise ValueError(f"Dataset {str(source)!r} (split {split!r}) holds no records.")
    return records


# -- records → prompt/answer pairs --------------------------------------------------------------------------------
def llm_adapters_prompt(instruction: str, input_text: Optional[str] = None) -> str:
    """The prompt of an LLM-Adapters record.

    The NaRA authors' reference code (``data/basic_tools.py`` at 15718ac8) uses the ``instruction`` alone as the
    user turn and never reads ``input``, which to our knowledge is empty in their math14k and commonsense170k files,
    so for those the prompt is identical. A non-empty ``input`` is appended after a blank line rather than dropped.
    """
    if input_text is None or not str(input_text).strip():
        return instruction
    return f"{instruction}\n\n{input_text}"


def detect_schema(record: dict[str, Any]) -> str:
    """Name of the known schema whose prompt and answer columns ``record`` has.

    Raises:
        ValueError: no known schema fits; the message lists the columns found.
    """
    for name, (prompt_col, answer_col, _) in SCHEMAS.items():
        if prompt_col in record and answer_col in record:
            return name
    known = ", ".join(f"{n}: {p}/{a}" for n, (p, a, _) in SCHEMAS.items())
    raise ValueError(
        f"Cannot tell which columns hold the prompt and the answer; columns found: {sorted(record)}. Pass "
        f"prompt_column= and answer_column= (known schemas: {known})."
    )


def to_prompt_answer(
    records: Sequence[dict[str, Any]],
    *,
    prompt_column: Optional[str] = None,
    answer_column: Optional[str] = None,
    input_column: Optional[str] = None,
) -> list[PromptAnswer]:
    """Map raw records to `PromptAnswer` pairs.

    Args:
        records: Dicts, e.g. from `load_records`.
        prompt_column, answer_column: The columns holding prompt and answer. Both None: detect a known schema
            from the first record (LLM-Adapters, where ``input`` is joined to the ``instruction`` as in
            `llm_adapters_prompt`, or CodeFeedback).
        input_column: An optional column joined to the prompt like LLM-Adapters' ``input`` (missing or empty → ignored).

    Raises:
        ValueError: no records; only one of the two columns given; a record lacks a mapped column (the columns it
            has are named) or holds a non-text value there.
    """
    if not records:
        raise ValueError("No records to build SFT examples from.")
    if (prompt_column is None) != (answer_column is None):
        raise ValueError("Give both prompt_column and answer_column, or neither (to detect a known schema).")
    if prompt_column is None:
        prompt_column, answer_column, detected_input = SCHEMAS[detect_schema(records[0])]
        input_column = input_column if input_column is not None else detected_input
    pairs = []
    for i, record in enumerate(records):
        for column in (prompt_column, answer_column):
            if column not in record:
                raise ValueError(
                    f"Record {i} has no column {column!r}; columns found: {sorted(record)}. Set prompt_column= and "
                    "answer_column= to the columns that hold the prompt and the answer."
                )
        extra = record.get(input_column) if input_column is not None else None
        prompt = llm_adapters_prompt(
            _text(record[prompt_column], i, prompt_column), None if extra is None else _text(extra, i, input_column)
        )
        pairs.append(PromptAnswer(prompt, _text(record[answer_column], i, answer_column)))
    return pairs


def _text(value: Any, index: int, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"Record {index}, column {column!r}: expected text, got {type(value).__name__} ({value!r:.60}).")


# -- validation split ---------------------------------------------------------------------------------------------
def split_train_val(
    items: Sequence[T], *, val_size: Union[int, float] = DEFAULT_VAL_SIZE, seed: int = DEFAULT_SEED
) -> tuple[list[T], list[T]]:
    """Split into (train, val) by seed, picking the same rows as ``datasets``' ``train_test_split``.

    Rows are ordered by ``numpy.random.default_rng(seed).permutation(len(items))``; the first ``val_size`` go to
    validation, the rest (in permuted order) to training.

    Args:
        items: Anything indexable (raw records or `PromptAnswer` pairs).
        val_size: Number of validation examples, or a fraction in (0, 1) (rounded up). 0 → no validation split.
        seed: Seed of the permutation.

    Raises:
        ValueError: ``val_size`` negative or leaving no training example.
    """
    n = len(items)
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"A fractional val_size must be in [0, 1), got {val_size}.")
        n_val = math.ceil(val_size * n)
    else:
        n_val = int(val_size)
        if n_val < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}.")
    if n_val >= n:
        raise ValueError(
            f"val_size={val_size} takes {n_val} of the {n} examples and leaves none for training; pass a smaller "
            "val_size (0 disables the validation split)."
        )
    if n_val == 0:
        return list(items), []
    order = np.random.default_rng(seed).permutation(n)
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


# -- tokenisation -------------------------------------------------------------------------------------------------
class SFTDataset(Dataset):
    """Tokenised SFT examples; item ``i`` is padded with EOS to ``max_length`` when read.

    Stored compactly (one flat int32 tensor of prompt + answer + EOS tokens and offsets), so a 170k-example set
    costs about 4 bytes per real token instead of ``max_length`` int64s per example.

    Items: ``{"input_ids": [max_length] long, "prompt_length": int}``.

    Attributes:
        max_length: Length every item is padded to.
        eos_token_id: The padding (and end-of-answer) token.
        num_dropped: Examples left out because they were longer than ``max_length``.
        prompt_lengths: ``[n]`` long, prompt tokens per example.
        lengths: ``[n]`` long, prompt + answer + one EOS per example (before padding).
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        *,
        max_length: int,
        eos_token_id: int,
        num_dropped: int = 0,
    ) -> None:
        self.max_length = int(max_length)
        self.eos_token_id = int(eos_token_id)
        self.num_dropped = int(num_dropped)
        self.prompt_lengths = torch.as_tensor(list(prompt_lengths), dtype=torch.long)
        self.lengths = torch.as_tensor([len(s) for s in sequences], dtype=torch.long)
        if len(self.lengths) != len(self.prompt_lengths):
            raise ValueError("sequences and prompt_lengths must have the same number of examples.")
        if bool((self.lengths > self.max_length).any()) or bool((self.prompt_lengths >= self.lengths).any()):
            raise ValueError("Every sequence must fit max_length and hold at least one token after its prompt.")
        self._offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.long)
        torch.cumsum(self.lengths, 0, out=self._offsets[1:])
        flat = [token for sequence in sequences for token in sequence]
        self._tokens = torch.as_tensor(flat, dtype=torch.int32 if max(flat, default=0) < 2**31 else torch.long)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        index %= len(self)
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        input_ids = torch.full((self.max_length,), self.eos_token_id, dtype=torch.long)
        input_ids[: end - start] = self._tokens[start:end]
        return {"input_ids": input_ids, "prompt_length": int(self.prompt_lengths[index])}


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer defines a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the user turn of the chat template, generation prompt included.

    Renders the template to text and tokenises it without adding special tokens, which is what
    ``apply_chat_template(..., tokenize=True)`` does. Without a chat template: the plain prompt text, tokenised
    with the tokenizer's usual special tokens (e.g. BOS).
    """
    if not has_chat_template(tokenizer):
        return tokenizer(list(prompts))["input_ids"]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_sft(
    tokenizer: Any,
    pairs: Sequence[PromptAnswer],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    chunk_size: int = 1024,
) -> SFTDataset:
    """Tokenise prompt/answer pairs into an `SFTDataset` (prompt, answer, one EOS, EOS padding to ``max_length``).

    Examples with prompt + answer + EOS longer than ``max_length`` are dropped; the count is logged and kept in
    ``dataset.num_dropped``.

    Raises:
        ValueError: no pairs, ``max_length`` < 2, a tokenizer without an EOS token, or every example too long
            (the message says which ``max_length`` would fit).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and an EOS), got {max_length}.")
    if not pairs:
        raise ValueError("No examples to tokenise.")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "The tokenizer has no EOS token, which ends every answer and pads it to max_length. Set one, e.g. "
            "tokenizer.eos_token = '<|endoftext|>' (LLaDA's EOS)."
        )
    if not has_chat_template(tokenizer):
        warnings.warn(
            "The tokenizer has no chat template; SFT examples fall back to plain text (the prompt's tokens, then "
            "the answer's). Set tokenizer.chat_template to train in the chat format.",
            UserWarning,
            stacklevel=2,
        )
    sequences: list[list[int]] = []
    prompt_lengths: list[int] = []
    too_long: list[int] = []
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        prompts = encode_prompts(tokenizer, [p.prompt for p in chunk])
        answers = tokenizer([p.answer for p in chunk], add_special_tokens=False)["input_ids"]
        for prompt, answer in zip(prompts, answers, strict=True):
            sequence = [*prompt, *answer, eos]
            if len(sequence) > max_length:
                too_long.append(len(sequence))
                continue
            sequences.append(sequence)
            prompt_lengths.append(len(prompt))
    if not sequences:
        raise ValueError(
            f"All {len(pairs)} examples are longer than max_length={max_length} tokens (prompt + answer + EOS): the "
            f"shortest needs {min(too_long)}, the longest {max(too_long)}. Set max_length >= {min(too_long)} "
            f"(>= {max(too_long)} keeps every example)."
        )
    if too_long:
        logger.warning(
            "Dropped %d of %d SFT examples longer than max_length=%d tokens (longest: %d).",
            len(too_long),
            len(pairs),
            max_length,
            max(too_long),
        )
    return SFTDataset(sequences, prompt_lengths, max_length=max_length, eos_token_id=eos, num_dropped=len(too_long))


def collate_sft(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `SFTDataset` items into ``{"input_ids": [B, L] long, "prompt_lengths": [B] long}``.

    No attention mask: in masked-diffusion SFT the EOS padding is seen and predicted like any answer token.
    """
    lengths = {len(e["input_ids"]) for e in examples}
    if len(lengths) != 1:
        raise ValueError(f"Examples of different lengths {sorted(lengths)}; build them with one max_length.")
    return {
        "input_ids": torch.stack([torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]),
        "prompt_lengths": torch.as_tensor([int(e["prompt_length"]) for e in examples], dtype=torch.long),
    }


# -- everything together ------------------------------------------------------------------------------------------
@dataclass
class SFTSplits:
    """Training and validation `SFTDataset` (``val`` is None when ``val_size=0``)."""

    train: SFTDataset
    val: Optional[SFTDataset]


def load_sft_data(
    source: PathLike,
    tokenizer: Any,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    prompt_column: Optional[str] = None,
    answer_column: Optional[str] = None,
    input_column: Optional[str] = None,
    val_size: Union[int, float] = DEFAULT_VAL_SIZE,
    seed: int = DEFAULT_SEED,
    split: str = "train",
    **load_kwargs: Any,
) -> SFTSplits:
    """Read a dataset, split off validation by seed, and tokenise both parts.

    Like the NaRA authors, the split is taken from the raw records before too-long examples are dropped, so the
    validation set can end up slightly smaller than ``val_size``.

    Args:
        source: Local ``.json``/``.jsonl`` file or a ``datasets.load_dataset`` name (see `load_records`).
        tokenizer: A Hugging Face tokenizer with an EOS token (and, normally, a chat template).
        max_length: Every sequence is padded to this length; longer examples are dropped.
        prompt_column, answer_column, input_column: Column mapping (see `to_prompt_answer`).
        val_size: Validation examples (or a fraction); 0 for none.
        seed: Seed of the split.
        split: The split ``datasets.load_dataset`` loads (ignored for local files).
        **load_kwargs: Passed to ``datasets.load_dataset``.
    """
    records = load_records(source, split=split, **load_kwargs)
    pairs = to_prompt_answer(
        records, prompt_column=prompt_column, answer_column=answer_column, input_column=input_column
    )
    train_pairs, val_pairs = split_train_val(pairs, val_size=val_size, seed=seed)
    train = tokenize_sft(tokenizer, train_pairs, max_length=max_length)
    val = tokenize_sft(tokenizer, val_pairs, max_length=max_length) if val_pairs else None
    return SFTSplits(train=train, val=val)
