"""Token ids outside the model's vocabulary get a ValueError that names them (not an IndexError from the embedding),
at every place prompt ids enter: the sampler, the Monte-Carlo likelihood, the noise profile, the LLaDA forward."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_llada_config

import nara_diffusion as nd
from nara_diffusion.text import llada as llada_module
from nara_diffusion.text.likelihood import mc_loglikelihood
from nara_diffusion.text.llada import LLaDAModelLM
from nara_diffusion.text.noise_profile import noise_profile
from nara_diffusion.text.sampler import generate

V, MASK, EOS, PAD = 20, 18, 1, 0


def tiny_llada(seed: int = 0) -> LLaDAModelLM:
    config = tiny_llada_config(vocab_size=V, embedding_size=V, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    return LLaDAModelLM(config).eval()


SETTINGS = {"gen_length": 4, "steps": 4, "till_eos": False}


@pytest.mark.parametrize("bad,where", [(V, (0, 2)), (V + 1000, (1, 0)), (-1, (1, 3))], ids=["V", "far", "negative"])
def test_generate_names_an_out_of_vocabulary_prompt_id(bad, where):
    model = tiny_llada()
    ids = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 9]])
    ids[where] = bad
    with pytest.raises(ValueError) as err:
        generate(model, ids, **SETTINGS)
    message = str(err.value)
    assert str(bad) in message and f"[0, {V})" in message and "tokenizer" in message
    assert f"({where[0]}, {where[1]})" in message  # (row, position)
    # the largest valid id and an in-range prompt work
    ids[where] = V - 1
    assert generate(model, ids, **SETTINGS).shape == (2, 8)


def test_padding_ids_are_checked_too():
    model = tiny_llada()
    ids = torch.tensor([[V + 5, 3, 4], [6, 7, 8]])  # a wrong pad id in the left padding still reaches the embedding
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match=rf"{V + 5} at \(0, 0\)"):
        generate(model, ids, attention_mask=mask, **SETTINGS)


def test_special_token_ids_of_generate_are_checked():
    model = tiny_llada()
    ids = torch.tensor([[2, 3, 4]])
    with pytest.raises(ValueError, match=rf"mask_token_id.*{V + 3}.*\[0, {V}\)"):
        generate(model, ids, mask_token_id=V + 3, **SETTINGS)
    with pytest.raises(ValueError, match=rf"banned_tokens.*{V}.*\[0, {V}\)"):
        generate(model, ids, banned_tokens=[V], **SETTINGS)
    with pytest.raises(ValueError, match=r"suppress_tokens.*-2"):
        generate(model, ids, suppress_tokens=[-2], **SETTINGS)
    with pytest.raises(ValueError, match=rf"eos_token_id.*{V + 1}"):
        generate(model, ids, eos_token_id=V + 1, gen_length=4, steps=4, till_eos=True)


def test_generate_checks_the_prompt_once_not_at_every_step(monkeypatch):
    model = tiny_llada()
    calls = []
    original = llada_module.check_token_ids
    monkeypatch.setattr(llada_module, "check_token_ids", lambda *a, **k: calls.append(1) or original(*a, **k))
    generate(model, torch.tensor([[2, 3, 4]]), gen_length=8, steps=8, block_length=4, till_eos=False)
    assert calls == []  # the forward's own check is skipped inside generate: the prompt was checked at the start
    model(torch.tensor([[2, 3]]))
    assert calls == [1]  # a direct call is checked


@pytest.mark.parametrize("bad", [V, -3])
def test_the_llada_forward_names_an_out_of_vocabulary_id(bad):
    model = tiny_llada()
    ids = torch.tensor([[2, 3, bad, 5]])
    with pytest.raises(ValueError, match=rf"input_ids.*\[0, {V}\): {bad} at \(0, 2\).*tokenizer"):
        model(ids)
    model(ids.clamp(0, V - 1))  # in range: fine


def test_mc_loglikelihood_checks_prefix_and_target():
    model = tiny_llada()
    with pytest.raises(ValueError, match=rf"prefix.*\[0, {V}\): {V + 2} at 2\b"):
        mc_loglikelihood(model, [2, 3, V + 2], [4, 5], mc_num=2, batch_size=2)
    with pytest.raises(ValueError, match=rf"target.*\[0, {V}\): -1 at 1\b"):
        mc_loglikelihood(model, [2, 3], [4, -1], mc_num=2, batch_size=2)
    assert isinstance(mc_loglikelihood(model, [2, 3], [4, V - 1], mc_num=2, batch_size=2), float)


def test_noise_profile_checks_the_dataset_ids():
    model = tiny_llada()
    good = {"input_ids": torch.tensor([2, 3, 4, 5, 6, EOS]), "prompt_length": 2}
    bad = {"input_ids": torch.tensor([2, 3, V, 5, 6, EOS]), "prompt_length": 2}
    assert noise_profile(model, [good, good], [0.5]).shape == (1,)
    with pytest.raises(ValueError, match=rf"\[0, {V}\): {V} at \(1, 2\)"):
        noise_profile(model, [good, bad], [0.5], batch_size=2)


def test_a_nara_wrapped_model_is_checked_against_the_base_vocabulary():
    model = nd.get_nara_model(tiny_llada(), nd.NaRAConfig(r=2))
    with pytest.raises(ValueError, match=rf"\[0, {V}\): {V} at \(0, 1\)"):
        generate(model, torch.tensor([[2, V]]), **SETTINGS)
