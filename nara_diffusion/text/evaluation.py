"""Evaluating masked-diffusion LMs and their adapters: answer extraction and accuracy, LLaDA's Monte-Carlo likelihood,
the noise-level loss profile, and loading a base model with any adapter this package trains.

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
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import collate_sft, encode_prompts, to_prompt_answer
from .masking import MASKING_MODES, MaskingMode
from .objectives import sft_loss
from .sampler import Denoiser, MaskRatio, generate, noise_bin_count, noise_bin_index
from .token_ids import check_special_ids, check_token_ids, model_vocab_size, token_ids_checked

logger = logging.getLogger(__name__)

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


# -- loading a model with its adapter -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def noise_bin_folders(path: Union[str, Path]) -> list[Path]:
    """The ``noise_bin_<k>`` adapter sub-folders of a noise-bin set, in bin order (empty if ``path`` is not one)."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    found = [d for d in folder.iterdir() if d.is_dir() and noise_bin_index(d.name) is not None]
    found = [d for d in found if (d / "adapter_config.json").is_file()]
    return sorted(found, key=lambda d: noise_bin_index(d.name))


def adapter_base_model(path: Union[str, Path]) -> Optional[str]:
    """The ``base_model_name_or_path`` an adapter folder (or noise-bin set) records, if any."""
    folder = Path(path)
    configs = [folder / "adapter_config.json"] + [d / "adapter_config.json" for d in noise_bin_folders(folder)]
    for config in configs:
        if config.is_file():
            return _read_json(config).get("base_model_name_or_path") or None
    return None


def load_adapter(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Put the adapter in ``path`` on ``model``: a NaRA or NaRA-C folder, a peft LoRA folder, or a noise-bin set
    (a folder of ``noise_bin_1 … noise_bin_K`` LoRA folders, as ``finetune.py --adapter multi-lora`` writes).

    Raises:
        FileNotFoundError: ``path`` is none of these.
        ValueError: a noise-bin set with a missing bin.
    """
    import peft

    from nara_diffusion.core import load_nara_model

    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        if _read_json(config_file).get("peft_type") == "NARA":
            return load_nara_model(model, folder)
        return peft.PeftModel.from_pretrained(model, folder)
    bins = noise_bin_folders(folder)
    if not bins:
        raise FileNotFoundError(
            f"{folder} holds no adapter: expected adapter_config.json (NaRA or LoRA) or noise_bin_<k>/ sub-folders "
            "(a noise-bin set)."
        )
    numbers = [noise_bin_index(d.name) for d in bins]
    missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    if missing or 0 in numbers:
        raise ValueError(
            f"Incomplete noise-bin set in {folder}: found {[d.name for d in bins]}, missing bins "
            f"{missing or [0]}; every bin 1..K needs its adapter folder."
        )
    peft_model = peft.PeftModel.from_pretrained(model, bins[0], adapter_name=bins[0].name)
    for sub in bins[1:]:
        peft_model.load_adapter(sub, adapter_name=sub.name)
    noise_bin_count(peft_model)
    return peft_model


def load_for_inference(
    adapter: Optional[Union[str, Path]] = None, model: Optional[str] = None, dtype: str = "float32"
) -> tuple[nn.Module, Any]:
    """Load a base model (and tokenizer) with an optional adapter, in eval mode.

    Args:
        adapter: An adapter folder or noise-bin set (see `load_adapter`), a fully fine-tuned model folder, or None
            for the bare base model.
        model: The base model (local folder or Hub id). Default: the one the adapter records.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Returns:
        ``(model, tokenizer)``; the tokenizer saved with the adapter wins over the base model's.
    """
    from transformers import AutoTokenizer

    from .finetune import DTYPES, load_base_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    folder = Path(adapter) if adapter is not None else None
    is_adapter = folder is not None and ((folder / "adapter_config.json").is_file() or noise_bin_folders(folder))
    if folder is not None and not is_adapter:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} is neither an adapter folder (adapter_config.json, or noise_bin_<k>/ sub-folders) nor a "
                "model folder (config.json)."
            )
        base, tokenizer = load_base_model(str(folder), dtype)
        return base.eval(), tokenizer
    name = model or (adapter_base_model(folder) if folder is not None else None)
    if not name:
        raise ValueError("No base model: pass model= (the adapter folder does not record base_model_name_or_path).")
    base, tokenizer = load_base_model(name, dtype)
    if folder is None:
        return base.eval(), tokenizer
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return load_adapter(base, folder).eval(), tokenizer


# -- prompts in, text out ---------------------------------------------------------------------------------------------
def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS, and LLaDA-Instruct's end of turn ``<|eot_id|>`` if the vocabulary has it."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tokenizer.get_vocab() else None
    return ids + ([eot] if eot is not None and eot not in ids else [])


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: Union[str, torch.device] = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``([B, P] ids, [B, P] attention mask)``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def pad_token_for(tokenizer: Any, mask_token_id: Optional[int]) -> int:
    """The padding id for prompts: the tokenizer's pad token, or EOS when it has none or pads with the mask token."""
    pad = tokenizer.pad_token_id
    if pad is None or pad == mask_token_id:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token to left-pad prompts with.")
    return int(pad)


def decode_generation(tokenizer: Any, ids: Sequence[int], stop_ids: Iterable[int] = ()) -> str:
    """Text of generated ids, cut before the first stop token (EOS/EoT), special tokens removed."""
    ids = [int(i) for i in ids]
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate an answer for each tokenised prompt, in batches of similar length (left-padded), in input order.

    ``generate_kwargs`` go to `generate` (``gen_length``, ``steps``, ``block_length``, ...).
    """
    from tqdm.auto import tqdm

    mask_id = generate_kwargs.get("mask_token_id")
    if mask_id is None:
        mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    pad = pad_token_for(tokenizer, mask_id)
    stops = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    texts: list[Optional[str]] = [None] * len(prompt_ids)
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="generating"):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([prompt_ids[i] for i in chunk], pad, device)
        out = generate(model, ids, attention_mask=mask, **generate_kwargs)
        for row, i in enumerate(chunk):
            texts[i] = decode_generation(tokenizer, out[row, ids.shape[1] :].tolist(), stops)
    return texts


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


# -- LLaDA's Monte-Carlo likelihood -----------------------------------------------------------------------------------
def stratified_mask_counts(
    batch_size: int, target_length: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """LLaDA's stratified mask counts: a random start k ∈ [1, T], then ``batch_size`` evenly spaced counts mod T,
    each in [1, T]. Returns ``[batch_size]`` long (on the CPU)."""
    k = int(torch.randint(1, target_length + 1, (), generator=generator))
    counts = torch.linspace(float(k), k + (batch_size - 1) * (target_length / batch_size), steps=batch_size)
    counts = torch.round(counts).long()
    return (counts - 1) % target_length + 1


@torch.no_grad()
def mc_loglikelihood(
    model: nn.Module,
    prefix: Union[Sequence[int], torch.Tensor],
    target: Union[Sequence[int], torch.Tensor],
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    mask_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> float:
    """LLaDA's Monte-Carlo ELBO of ``log p(target | prefix)``.

    ``mc_num`` samples in mini-batches of ``batch_size``; each mini-batch masks exactly ``n`` target tokens at random
    positions, with ``n`` stratified over [1, T] (`stratified_mask_counts`); the prefix is never masked. The estimate
    is −mean over samples of Σ_masked CE / (n / T). A NaRA adapter gets λ = n / T (the sample's mask ratio over the
    target, as in training); a noise-bin set uses the bin of n / T. ``cfg_scale`` > 0 adds LLaDA's unsupervised CFG
    (the prefix masked in the unconditional half).

    Returns:
        The estimate (a float; higher is more likely).

    Raises:
        ValueError: a prefix or target id (or the mask token) outside [0, vocab_size) of the model.
    """
    config = getattr(model, "config", None)
    mask_id = mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("No mask token: pass mask_token_id= (the model's config has no mask_token_id).")
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be positive, got {mc_num} and {batch_size}.")
    device = next(model.parameters()).device
    prefix = torch.as_tensor(prefix, dtype=torch.long).flatten()
    target = torch.as_tensor(target, dtype=torch.long).flatten()
    if target.numel() == 0:
        raise ValueError("The continuation is empty: there is nothing to score.")
    vocab_size = model_vocab_size(model)
    check_token_ids(prefix, vocab_size, "prefix")  # once here; the model's per-forward check is skipped below
    check_token_ids(target, vocab_size, "target")
    check_special_ids(vocab_size, mask_token_id=mask_id)
    seq = torch.cat([prefix, target]).to(device)
    width, length = prefix.numel(), target.numel()
    total, done = torch.zeros((), dtype=torch.float64, device=device), 0
    with Denoiser(model) as denoise, token_ids_checked():
        while done < mc_num:
            size = min(batch_size, mc_num - done)
            counts = stratified_mask_counts(size, length, generator).to(device)
            scores = torch.rand((size, length), generator=generator).to(device)
            ranks = scores.argsort(1).argsort(1)
            masked = torch.cat([torch.zeros(size, width, dtype=torch.bool, device=device), ranks < counts[:, None]], 1)
            noisy = seq.expand(size, -1).masked_fill(masked, mask_id)
            noise = MaskRatio(counts, torch.full_like(counts, length))
            ids, positions = noisy, masked
            if cfg_scale > 0:
                uncond = noisy.clone()
                uncond[:, :width] = mask_id
                ids, positions = torch.cat([noisy, uncond]), torch.cat([masked, masked])
                noise = MaskRatio(noise.masked.repeat(2), noise.total.repeat(2))
            logits = denoise(ids, positions, noise).float()
            if cfg_scale > 0:
                cond, uncond_logits = logits.chunk(2)
                logits = uncond_logits + (cfg_scale + 1.0) * (cond - uncond_logits)
            ce = F.cross_entropy(logits, seq.expand(size, -1)[masked], reduction="none")
            rows = masked.nonzero()[:, 0]
            total += (ce.double() / (counts.double()[rows] / length)).sum()
            done += size
    return -float(total / mc_num)


# -- the noise-level loss profile ----------------------------------------------------------------------------------
@torch.no_grad()
def noise_profile(
    model: nn.Module,
    dataset: Dataset,
    ts: Sequence[float],
    *,
    mask_token_id: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
    mode: MaskingMode = "uniform",
    progress: bool = False,
) -> torch.Tensor:
    """The masked-diffusion SFT loss (LLaDA's ELBO) of ``model`` on ``dataset`` at each fixed noise level t.

    For each t, every example has ⌈t·answer_len⌉ answer tokens masked (``mode="uniform"``); the positions come
    from a CPU generator seeded by (seed, t index, batch index), so every model compared with the same dataset,
    ``ts``, ``batch_size`` and ``seed`` sees the same masks. A NaRA adapter gets λ = t; a noise-bin set uses the
    adapter of t's bin.

    Args:
        model: Base model, or one with a NaRA, LoRA or noise-bin adapter.
        dataset: Tokenised SFT examples (`tokenize_sft` / `load_sft_data`), items ``{"input_ids", "prompt_length"}``.
        ts: Noise levels in (0, 1].
        mask_token_id: Default ``model.config.mask_token_id``.
        batch_size: Examples per forward.
        seed: Seed of the masks.
        mode: ``"uniform"`` (exactly ⌈t·n⌉ masked) or ``"bernoulli"``.
        progress: Show a progress bar.

    Returns:
        ``[len(ts)]`` float64: the mean per-example loss at each t.
    """
    from tqdm.auto import tqdm

    if mode not in MASKING_MODES:
        raise ValueError(f"mode must be one of {MASKING_MODES}, got {mode!r}.")
    ts = [float(t) for t in ts]
    if not ts or not all(0.0 < t <= 1.0 for t in ts):
        raise ValueError(f"ts must be noise levels in (0, 1], got {ts}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    mask_id = mask_token_id if mask_token_id is not None else getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("No mask token: pass mask_token_id= (the model's config has no mask_token_id).")
    device = next(model.parameters()).device
    vocab_size = model_vocab_size(model)
    check_special_ids(vocab_size, mask_token_id=mask_id)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_sft)
    losses = torch.zeros(len(ts), dtype=torch.float64)
    with Denoiser(model) as denoise, token_ids_checked():  # the ids are checked per batch below, before the device
        for i, t in enumerate(tqdm(ts, disable=not progress, desc="noise profile")):
            if denoise.num_bins:
                denoise.use_bin(min(max(1, math.ceil(t * denoise.num_bins - 1e-9)), denoise.num_bins))
            total, count = 0.0, 0
            for j, batch in enumerate(loader):
                gen = torch.Generator().manual_seed((seed * 1_000_003 + i) * 100_003 + j)
                if i == 0:  # on the CPU: no device sync; the same batches come back for every t
                    check_token_ids(batch["input_ids"], vocab_size, f"input_ids (rows = examples {j * batch_size}+)")
                ids, prompts = batch["input_ids"].to(device), batch["prompt_lengths"].to(device)
                loss = sft_loss(model, ids, prompts, mask_token_id=mask_id, generator=gen, t=t, mode=mode).loss
                total += float(loss) * ids.shape[0]
                count += ids.shape[0]
            losses[i] = total / count
    return losses


def compare_noise_profiles(
    base: nn.Module,
    adapters: Mapping[str, Union[str, Path]],
    dataset: Dataset,
    ts: Sequence[float],
    *,
    base_label: str = "base",
    **profile_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """`noise_profile` of the base model and of each adapter put on it in turn (same masks for all).

    Args:
        base: The base model; each adapter is loaded onto it (`load_adapter`) and unloaded again afterwards.
        adapters: Label → adapter folder (NaRA, LoRA or noise-bin set).
        dataset, ts, **profile_kwargs: As in `noise_profile`.
        base_label: Label of the base model's curve (None-like empty string: leave it out).

    Returns:
        Label → ``[len(ts)]`` losses, base first.
    """
    profiles: dict[str, torch.Tensor] = {}
    if base_label:
        profiles[base_label] = noise_profile(base, dataset, ts, **profile_kwargs)
    for label, path in adapters.items():
        model = load_adapter(base, path)
        try:
            profiles[label] = noise_profile(model, dataset, ts, **profile_kwargs)
        finally:
            base = model.unload()
    return profiles


def plot_noise_profiles(
    ts: Sequence[float],
    profiles: Mapping[str, Sequence[float]],
    path: Union[str, Path],
    *,
    baseline: Optional[str] = "base",
    title: str = "Masked-diffusion loss by noise level",
) -> Path:
    """Draw loss-vs-t curves (left) and, when ``baseline`` is among the profiles, each model's loss reduction
    relative to it (right: where an adapter's gain lies along the noise levels). Writes a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_gain = baseline is not None and baseline in profiles and len(profiles) > 1
    fig, axes = plt.subplots(1, 2 if with_gain else 1, figsize=(11 if with_gain else 6, 4), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(profiles)}  # one colour per model in both panels
    ax = axes[0, 0]
    for name, values in profiles.items():
        ax.plot(list(ts), [float(v) for v in values], marker="o", color=colors[name], label=name)
    ax.set(xlabel="noise level t (fraction of answer tokens masked)", ylabel="loss (ELBO per example)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if with_gain:
        ax = axes[0, 1]
        base = [float(v) for v in profiles[baseline]]
        for name, values in profiles.items():
            if name != baseline:
                gain = [b - float(v) for b, v in zip(base, values, strict=True)]
                ax.plot(list(ts), gain, marker="o", color=colors[name], label=name)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(xlabel="noise level t", ylabel=f"loss reduction vs {baseline}", title="Gain by noise level")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "ANSWER_KINDS",
    "GenerationEval",
    "accuracy",
    "adapter_base_model",
    "answer_kind",
    "compare_noise_profiles",
    "decode_generation",
    "evaluate_generation",
    "extract_commonsense",
    "extract_number",
    "extract_option",
    "generate_texts",
    "left_pad",
    "load_adapter",
    "load_for_inference",
    "mc_loglikelihood",
    "noise_bin_folders",
    "noise_profile",
    "normalize_text",
    "pad_token_for",
    "plot_noise_profiles",
    "score_answer",
    "stop_token_ids",
    "stratified_mask_counts",
]
