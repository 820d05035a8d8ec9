"""Scoring generated answers: the answer extracted from a generation, compared with the gold, and the accuracy of
a model's generations on a test set (`evaluate_generation`).

Answer formats (``kind``):

- ``"math"``: the final number (GSM8K, SVAMP, AddSub, MultiArith, SingleEq): the number after ``####`` when there is
  one, else the last number of the text, commas removed; correct within 1e-3 (as LLM-Adapters scores).
- ``"option"``: an option letter A–E (AQuA): the letter of "answer is (X)" / "answer: X" when present, else the last
  stand-alone capital A–E (LLM-Adapters' first-letter rule also matches the "B" of "Because").
- ``"commonsense"``: the LLM-Adapters formats ``true/false`` (BoolQ), ``option1/2`` (WinoGrande), ``answer1–5`` (SIQA,
  ARC, OBQA), ``solution1/2`` (PIQA), ``ending1–4`` (HellaSwag): the first occurrence of the gold's format in the
  lower-cased text, as LLM-Adapters and the NaRA authors extract it.
- ``"exact"``: the whole generation equals the gold after stripping and collapsing whitespace.
- ``"auto"``: per example, from the gold answer: a commonsense keyword, a single letter A–E, a number (or ``####``),
  else exact match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from torch import nn

from .data import encode_prompts, to_prompt_answer
from .prompting import generate_texts

AnswerKind = Literal["auto", "math", "option", "commonsense", "exact"]
ANSWER_KINDS: tuple[str, ...] = ("auto", "math", "option", "commonsense", "exact")
#: LLM-Adapters commonsense answer formats: a regex per format, keyed by the gold answers it covers.
COMMONSENSE_FORMATS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"true", "false"}), r"true|false"),
    (frozenset({"option1", "option2"}), r"option[12]"),
    (frozenset(f"answer{i}" for i in range(1, 6)), r"answer[1-5]"),
    (frozenset({"solution1", "solution2"}), r"solution[12]"),
    (frozenset(f"ending{i}" for i in range(1, 5)), r"ending[1-4]"),
)
MATH_TOLERANCE = 1e-3
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


# -- answer extraction --------------------------------------------------------------------------------------------
def extract_number(text: str) -> Optional[float]:
    """The final number of a math answer: the one after ``####`` if present, else the last one; None if none."""
    text = _THOUSANDS.sub("", text)
    if "####" in text:
        after = _NUMBER.findall(text.rsplit("####", 1)[1])
        if after:
            return float(after[0])
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def extract_option(text: str, options: str = "ABCDE") -> Optional[str]:
    """The chosen option letter: from "answer is (X)" / "answer: X" if present, else the last stand-alone letter."""
    letters = re.escape(options)
    stated = re.findall(rf"answer\s*(?:is|:)?\s*(?:option\s*)?\(?([{letters}])\b", text, flags=re.IGNORECASE)
    stated = [s.upper() for s in stated if s.upper() in options]
    if stated:
        return stated[-1]
    alone = re.findall(rf"\b([{letters}])\b", text)
    return alone[-1] if alone else None


def extract_commonsense(text: str, gold: str) -> Optional[str]:
    """The first answer of the gold's LLM-Adapters format in the lower-cased text (the gold itself if unknown)."""
    gold = gold.strip().lower()
    lowered = text.lower()
    pattern = next((p for golds, p in COMMONSENSE_FORMATS if gold in golds), re.escape(gold))
    match = re.search(pattern, lowered)
    return match.group(0) if match else None


def normalize_text(text: str) -> str:
    """Strip and collapse runs of whitespace (the comparison of ``"exact"``)."""
    return " ".join(text.split())


def answer_kind(gold: Any) -> str:
    """The ``kind`` ``"auto"`` picks for a gold answer."""
    text = str(gold).strip()
    if any(text.lower() in golds for golds, _ in COMMONSENSE_FORMATS):
        return "commonsense"
    if len(text) == 1 and text in "ABCDE":
        return "option"
    if "####" in text or _NUMBER.fullmatch(_THOUSANDS.sub("", text)):
        return "math"
    return "exact"


def score_answer(prediction: str, gold: Any, kind: AnswerKind = "auto") -> tuple[Any, bool]:
    """Extract the answer from a generated text and compare it with the gold.

    Args:
        prediction: The generated text.
        gold: The reference answer (a number, a letter, a commonsense keyword or a text; for ``"math"`` also a
            full worked solution, whose final number counts).
        kind: An answer format (see the module docstring).

    Returns:
        ``(extracted, correct)``; ``extracted`` is None when nothing could be extracted.
    """
    if kind not in ANSWER_KINDS:
        raise ValueError(f"kind must be one of {ANSWER_KINDS}, got {kind!r}.")
    kind = answer_kind(gold) if kind == "auto" else kind
    if kind == "math":
        value, reference = extract_number(prediction), extract_number(str(gold))
        if reference is None:
            raise ValueError(f"The gold answer {gold!r} holds no number; use kind='exact' for non-numeric answers.")
        return value, value is not None and abs(value - reference) <= MATH_TOLERANCE
    if kind == "option":
        choice = extract_option(prediction)
        return choice, choice is not None and choice == str(gold).strip().upper()
    if kind == "commonsense":
        choice = extract_commonsense(prediction, str(gold))
        return choice, choice is not None and choice == str(gold).strip().lower()
    text = normalize_text(prediction)
    return text, text == normalize_text(str(gold))


def accuracy(predictions: Sequence[str], golds: Sequence[Any], kind: AnswerKind = "auto") -> float:
    """Fraction of predictions whose extracted answer matches the gold."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answers.")
    if not golds:
        raise ValueError("No predictions to score.")
    return sum(score_answer(p, g, kind)[1] for p, g in zip(predictions, golds, strict=True)) / len(golds)


# -- a test set ----------------------------------------------------------------------------------------------------
@dataclass
class GenerationEval:
    """Accuracy of generated answers, with one record per example (index, prompt, gold, prediction, extracted,
    correct)."""

    accuracy: float
    correct: int
    total: int
    records: list[dict[str, Any]] = field(default_factory=list)

    def write_jsonl(self, path: Union[str, Path]) -> None:
        """Write the per-example records as JSON lines."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for record in self.records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    kind: AnswerKind = "auto",
    gold_column: Optional[str] = None,
    prompt_column: Optional[str] = None,
    answer_column: Optional[str] = None,
    batch_size: int = 8,
    progress: bool = False,
    **generate_kwargs: Any,
) -> GenerationEval:
    """Generate an answer for each record (chat-templated like training) and score it.

    Args:
        model, tokenizer: As from `load_for_inference`.
        records: Test records, e.g. LLM-Adapters test JSON (``instruction``, ``input``, ``output``, ``answer``).
        kind: Answer format (see the module docstring).
        gold_column: Column of the gold answer. Default: ``answer`` when the records have it, else the answer
            column (e.g. ``output``; for ``"math"`` its final number counts).
        prompt_column, answer_column: As in `to_prompt_answer` (default: detect the schema).
        batch_size: Prompts per sampler batch.
        progress: Show a progress bar.
        **generate_kwargs: `generate` settings.
    """
    pairs = to_prompt_answer(list(records), prompt_column=prompt_column, answer_column=answer_column)
    if gold_column is None:
        gold_column = "answer" if all("answer" in r for r in records) else None
    golds = [r[gold_column] if gold_column else p.answer for r, p in zip(records, pairs, strict=True)]
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in pairs])
    texts = generate_texts(model, tokenizer, prompt_ids, batch_size=batch_size, progress=progress, **generate_kwargs)
    rows, correct = [], 0
    for i, (pair, gold, text) in enumerate(zip(pairs, golds, texts, strict=True)):
        extracted, ok = score_answer(text, gold, kind)
        correct += ok
        rows.append(
            {"index": i, "prompt": pair.prompt, "gold": gold, "prediction": text, "extracted": extracted, "correct": ok}
        )
    return GenerationEval(correct / len(rows), correct, len(rows), rows)


__all__ = [
    "ANSWER_KINDS",
    "COMMONSENSE_FORMATS",
    "MATH_TOLERANCE",
    "AnswerKind",
    "GenerationEval",
    "accuracy",
    "answer_kind",
    "evaluate_generation",
    "extract_commonsense",
    "extract_number",
    "extract_option",
    "normalize_text",
    "score_answer",
]
