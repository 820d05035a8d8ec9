"""SFT data: chat-templated prompts, one EOS then EOS padding, dropping, readers, column mapping, split, collator."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from builders import tiny_chat_tokenizer
from torch.utils.data import DataLoader

from nara_diffusion.text.data import (
    PromptAnswer,
    SFTDataset,
    collate_sft,
    load_records,
    load_sft_data,
    read_json_records,
    split_train_val,
    to_prompt_answer,
    tokenize_sft,
)


@pytest.fixture
def tok():
    return tiny_chat_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids(text.split())


def write_json(path, records) -> str:
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return str(path)


# -- layout of one example ----------------------------------------------------------------------------------------
def test_prompt_is_the_chat_templated_user_turn_with_generation_prompt(tok):
    item = tokenize_sft(tok, [PromptAnswer("what is a", "b c")], max_length=12)[0]
    expected = ids(tok, "<|bos|> <|user|> what is a <|end|> <|assistant|>")
    templated = tok.apply_chat_template(
        [{"role": "user", "content": "what is a"}], tokenize=True, return_dict=True, add_generation_prompt=True
    )["input_ids"]
    assert templated == expected
    assert item["prompt_length"] == len(expected) == 7
    assert item["input_ids"][:7].tolist() == expected


def test_answer_then_one_eos_then_eos_padding_to_max_length(tok):
    ds = tokenize_sft(tok, [PromptAnswer("what is a", "b c")], max_length=13)
    input_ids = ds[0]["input_ids"]
    eos = tok.eos_token_id
    assert input_ids.dtype == torch.long and input_ids.shape == (13,)
    assert input_ids[7:9].tolist() == ids(tok, "b c")  # no BOS or other special token before the answer
    assert input_ids[9:].tolist() == [eos] * 4  # one EOS ends the answer, three pad it
    assert int(ds.lengths[0]) == 10
    exact = tokenize_sft(tok, [PromptAnswer("what is a", "b c")], max_length=10)[0]["input_ids"]
    assert exact.tolist() == [*ids(tok, "<|bos|> <|user|> what is a <|end|> <|assistant|> b c"), eos]


def test_examples_longer_than_max_length_are_dropped_counted_and_logged(tok, caplog):
    pairs = [PromptAnswer("a", "b"), PromptAnswer("a", "b c d e f g h"), PromptAnswer("what is two", "c")]
    with caplog.at_level(logging.WARNING, logger="nara_diffusion.text.data"):
        ds = tokenize_sft(tok, pairs, max_length=9)
    assert len(ds) == 2 and ds.num_dropped == 1
    assert ds.prompt_lengths.tolist() == [5, 7]
    assert ds[1]["input_ids"][7:].tolist() == [*ids(tok, "c"), tok.eos_token_id]
    assert "Dropped 1 of 3" in caplog.text and "max_length=9" in caplog.text


def test_every_example_too_long_names_a_max_length_that_fits(tok):
    pairs = [PromptAnswer("a", "b c d"), PromptAnswer("a b", "c d e f")]  # 5 + 3 + 1 = 9 and 6 + 4 + 1 = 11
    with pytest.raises(ValueError, match=r"max_length >= 9 \(>= 11 keeps every example\)"):
        tokenize_sft(tok, pairs, max_length=8)


def test_tokenizer_without_chat_template_falls_back_to_plain_text_with_a_warning(tok):
    plain = tiny_chat_tokenizer(chat_template=False)
    with pytest.warns(UserWarning, match="no chat template"):
        item = tokenize_sft(plain, [PromptAnswer("what is a", "b c")], max_length=8)[0]
    assert item["prompt_length"] == 4  # the tokenizer's own special tokens (here BOS) on the prompt only
    assert item["input_ids"].tolist() == [*ids(tok, "<|bos|> what is a b c"), plain.eos_token_id, plain.eos_token_id]


def test_tokenizer_without_eos_is_rejected():
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_sft(tiny_chat_tokenizer(eos=False), [PromptAnswer("a", "b")], max_length=8)


def test_collator_stacks_input_ids_and_prompt_lengths(tok):
    ds = tokenize_sft(tok, [PromptAnswer("a", "b"), PromptAnswer("what is two", "c d")], max_length=10)
    batch = collate_sft([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 10) and batch["input_ids"].dtype == torch.long
    assert batch["prompt_lengths"].tolist() == [5, 7] and batch["prompt_lengths"].dtype == torch.long
    assert torch.equal(batch["input_ids"][1], ds[1]["input_ids"])
    other = tokenize_sft(tok, [PromptAnswer("a", "b")], max_length=12)
    with pytest.raises(ValueError, match="different lengths"):
        collate_sft([ds[0], other[0]])


def test_dataset_rejects_sequences_longer_than_max_length():
    with pytest.raises(ValueError, match="fit max_length"):
        SFTDataset([[1, 2, 3]], [1], max_length=2, eos_token_id=0)


# -- readers and column mapping -----------------------------------------------------------------------------------
def test_llm_adapters_json_prompt_is_instruction_plus_input(tmp_path):
    path = write_json(
        tmp_path / "math_14k.json",
        [
            {"instruction": "what is two plus two", "input": "", "output": "the answer is 4", "answer": "4"},
            {"instruction": "what is a", "input": "b c", "output": "d"},
            {"instruction": "what is h", "output": "e"},
        ],
    )
    pairs = to_prompt_answer(load_records(path))
    assert pairs == [
        PromptAnswer("what is two plus two", "the answer is 4"),
        PromptAnswer("what is a\n\nb c", "d"),
        PromptAnswer("what is h", "e"),
    ]


def test_code_feedback_jsonl_uses_query_and_answer(tmp_path):
    path = write_jsonl(tmp_path / "code.jsonl", [{"query": "def f(x):", "answer": "return x", "lang": "python"}] * 2)
    assert to_prompt_answer(load_records(path)) == [PromptAnswer("def f(x):", "return x")] * 2


def test_custom_columns_and_numeric_answers(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "what is two plus three", "solution": 5}])
    pairs = to_prompt_answer(load_records(path), prompt_column="question", answer_column="solution")
    assert pairs == [PromptAnswer("what is two plus three", "5")]


def test_unknown_columns_are_named_in_the_error(tmp_path):
    records = read_json_records(write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "solution": "b"}]))
    with pytest.raises(ValueError, match=r"columns found: \['question', 'solution'\].*prompt_column="):
        to_prompt_answer(records)
    with pytest.raises(ValueError, match=r"no column 'response'; columns found: \['question', 'solution'\]"):
        to_prompt_answer(records, prompt_column="question", answer_column="response")
    with pytest.raises(ValueError, match="both prompt_column and answer_column"):
        to_prompt_answer(records, prompt_column="question")


def test_a_record_missing_a_column_is_named(tmp_path):
    path = write_json(tmp_path / "d.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "outptu": "d"}])
    found = r"columns found: \['instruction', 'outptu'\]"
    with pytest.raises(ValueError, match=r"Record 1 has no column 'output'; " + found):
        to_prompt_answer(load_records(path))


def test_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_records(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_records(tmp_path / "empty.json")
    (tmp_path / "text.json").write_text("instruction: a\noutput: b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="neither JSON nor JSONL: line 1"):
        load_records(tmp_path / "text.json")
    (tmp_path / "list.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no records"):
        load_records(tmp_path / "list.json")
    (tmp_path / "strings.json").write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(ValueError, match="record 0 is a str, not an object"):
        load_records(tmp_path / "strings.json")


def test_hub_names_go_to_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return datasets.Dataset.from_list([{"query": "a", "answer": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("m-a-p/CodeFeedback-Filtered-Instruction", split="train", revision="main")
    assert calls == [("m-a-p/CodeFeedback-Filtered-Instruction", "train", {"revision": "main"})]
    assert to_prompt_answer(records) == [PromptAnswer("a", "b")]


# -- validation split ---------------------------------------------------------------------------------------------
def test_validation_split_is_deterministic_disjoint_and_matches_datasets():
    import datasets

    items = list(range(300))
    train, val = split_train_val(items, val_size=128, seed=42)
    assert len(val) == 128 and len(train) == 172
    assert set(train).isdisjoint(val) and sorted(train + val) == items
    assert (train, val) == split_train_val(items, val_size=128, seed=42)
    assert split_train_val(items, val_size=128, seed=7)[1] != val
    # the NaRA authors split with datasets' train_test_split(test_size=128, seed=42): same rows
    reference = datasets.Dataset.from_dict({"i": items}).train_test_split(test_size=128, seed=42)
    assert val == reference["test"]["i"] and train == reference["train"]["i"]
    assert split_train_val(items, val_size=0, seed=42) == (items, [])
    assert len(split_train_val(items, val_size=0.1, seed=42)[1]) == 30
    with pytest.raises(ValueError, match="leaves none for training"):
        split_train_val(items[:100], val_size=128)


def test_load_sft_data_end_to_end(tok, tmp_path):
    records = [{"instruction": "what is " + w, "input": "", "output": w + " " + w} for w in "abcdefgh"] * 3
    records.append({"instruction": "a", "input": "", "output": " ".join(["b"] * 30)})  # too long
    path = write_json(tmp_path / "train.json", records)
    splits = load_sft_data(path, tok, max_length=16, val_size=4, seed=3)
    assert splits.val is not None and len(splits.train) + len(splits.val) == 24
    assert splits.train.num_dropped + splits.val.num_dropped == 1
    loader = DataLoader(splits.train, batch_size=5, collate_fn=collate_sft)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (5, 16) and batch["prompt_lengths"].tolist() == [7] * 5
    assert (batch["input_ids"][:, -1] == tok.eos_token_id).all()
    assert load_sft_data(path, tok, max_length=16, val_size=0).val is None
