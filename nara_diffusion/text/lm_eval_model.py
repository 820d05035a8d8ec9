"""An lm-evaluation-harness model for masked diffusion LMs (LLaDA, Dream) with NaRA, LoRA or noise-bin adapters.

Needs the ``eval`` extra (``pip install "nara-diffusion[eval]"``); ``import nara_diffusion`` does not import this
module. lm-eval discovers only its own models, so registering ``nara_llada`` (alias ``nara_dream``) takes importing
this module; the ``nara-lm-eval`` command (installed with the package) does that and then runs lm-eval's own
command line::

    nara-lm-eval --model nara_llada --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,adapter=out/final \\
        --tasks gsm8k --apply_chat_template --batch_size 8
    python -m nara_diffusion.text.lm_eval_model --model nara_llada ...        # the same

From Python, ``import nara_diffusion.text.lm_eval_model`` and then ``lm_eval.simple_evaluate(model="nara_llada",
model_args={...}, tasks=[...])``.

``generate_until`` runs `nara_diffusion.text.sampler.generate` (greedy unless ``temperature`` is set; the model
family's sampler: Dream's in one block with its timesteps schedule, ``alg``, ``alg_temp``, ``top_p``, ``top_k``,
``eps``) on batches of ``batch_size`` left-padded prompts, cuts the answer at the first EOS/EoT token and then at the
task's stop strings. As in LLaDA's harness, the sampler settings come from ``model_args``: a task's
``max_gen_toks``, ``temperature`` or ``do_sample`` are not used (the generation length of a diffusion sampler is
fixed up front). ``loglikelihood`` is LLaDA's Monte-Carlo ELBO (`nara_diffusion.text.likelihood.mc_loglikelihood`,
which reads a shifted family's logits at the row before each target token): ``mc_num`` samples in mini-batches of
``mc_batch_size``, stratified mask counts, the adapter given λ = the sample's mask ratio;
``is_greedy`` is computed only with ``is_check_greedy=True`` (by generating the continuation with one token per
step, LLaDA's ``suffix_greedy_prediction``). ``loglikelihood_rolling`` (perplexity tasks) is not defined for
masked diffusion LMs and raises.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from tqdm.auto import tqdm

from .likelihood import mc_loglikelihood
from .loading import load_for_inference
from .model_info import model_family, resolve_mask_token_id
from .prompting import decode_generation, left_pad, pad_token_for, stop_token_ids
from .sampler import CACHE_MODES, NOISE_RULES, generate, memoize_cores
from .trained_sampling import sampler_settings

logger = logging.getLogger(__name__)

MODEL_NAME = "nara_llada"
#: The same model under a name for Dream users (the family is read from the model either way).
MODEL_ALIASES = ("nara_dream",)
_NONE = ("", "none", "null")


def _optional(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() in _NONE else value


def _bool_or_none(value: Any) -> Optional[bool]:
    value = _optional(value)
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"Expected true/false/none, got {value!r}.")


class NaRALLaDA(TemplateLM):
    """lm-eval model: a masked-diffusion LM (native LLaDA or Dream) with an optional NaRA / LoRA / noise-bin adapter.

    Args (``--model_args key=value,...``):
        pretrained: Base model (Hub id or folder). Default: the one the adapter records.
        adapter: Adapter folder or noise-bin set (see `load_adapter`); none for the bare base model.
        dtype: ``bfloat16`` (default, as LLaDA evaluates), ``float32`` or ``float16``.
        device: Default: CUDA when available (the process's device under ``accelerate launch``), else CPU.
        batch_size: Prompts per sampler batch in ``generate_until``.
        gen_length, steps, block_length: Sampler settings. Default: the length the adapter was trained for
            (its ``sampling.json``) in one block, one token per step; without that file 256 / 256 / 8, the NaRA
            authors' GSM8K command (Dream: 256 / 256 in one block). A ``gen_length`` other than the trained one warns.
        temperature, cfg, remasking, threshold, noise_rule, till_eos: As in `generate` (``cfg`` is ``cfg_scale``;
            till_eos none: on for NaRA; remasking none: the family's, LLaDA ``low_confidence``, Dream ``entropy``).
        alg, alg_temp, top_p, top_k, eps, schedule: Dream's options, as in `generate` (``alg`` is ``remasking``
            under Dream's name; none: the family's defaults).
        cache: ``none`` (default), ``prefix`` or ``dual``: `generate`'s block-wise K/V cache (Fast-dLLM); with
            ``threshold=0.9`` the fast setting.
        mc_num, mc_batch_size: Monte-Carlo samples per likelihood and the samples per forward (LLaDA: 128 / 32).
        is_check_greedy: Compute ``is_greedy`` for loglikelihood requests (slow; LLaDA recommends off).
        max_length: Longest sequence; longer contexts are cut from the left. Default: the model's maximum.
        seed: Seed of the Monte-Carlo masks and of sampling.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        adapter: Optional[str] = None,
        dtype: str = "bfloat16",
        device: Optional[str] = None,
        batch_size: Union[int, str, None] = 1,
        gen_length: Optional[int] = None,
        steps: Optional[int] = None,
        block_length: Optional[int] = None,
        temperature: float = 0.0,
        cfg: float = 0.0,
        remasking: Optional[str] = None,
        threshold: Optional[float] = None,
        noise_rule: str = "generation",
        till_eos: Optional[bool] = None,
        cache: Optional[str] = None,
        alg: Optional[str] = None,
        alg_temp: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        eps: float = 1e-3,
        schedule: Optional[str] = None,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        is_check_greedy: bool = False,
        max_length: Optional[int] = None,
        seed: int = 1234,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise ValueError(f"Unknown nara_llada model_args {sorted(kwargs)}; see NaRALLaDA's docstring.")
        if _optional(noise_rule) not in NOISE_RULES:
            raise ValueError(f"noise_rule must be one of {NOISE_RULES}, got {noise_rule!r}.")
        if _optional(cache) not in (None, *CACHE_MODES):
            raise ValueError(f"cache must be none, {' or '.join(CACHE_MODES)}; got {cache!r}.")
        remasking, alg = _optional(remasking), _optional(alg)
        if remasking is not None and alg is not None and remasking != alg:
            raise ValueError(f"alg is remasking under Dream's name: give one of them, not {alg!r} and {remasking!r}.")
        from accelerate import PartialState

        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        self._state = state
        self.model, self.tokenizer = load_for_inference(_optional(adapter), _optional(pretrained), dtype)
        self._device = state.device
        if _optional(device) is not None and state.num_processes == 1:
            self._device = torch.device(device)
            if self._device.type == "cuda" and not torch.cuda.is_available():  # lm-eval's CLI asks for cuda
                logger.warning("device=%s requested but CUDA is not available; running on the CPU.", device)
                self._device = torch.device("cpu")
        self.model.to(self._device)
        self.mask_id = resolve_mask_token_id(self.model)
        if str(batch_size).startswith("auto"):
            logger.warning("nara_llada has no automatic batch size; using batch_size=1.")
            batch_size = 1
        self.batch_size = int(_optional(batch_size) or 1)
        given = {"gen_length": gen_length, "steps": steps, "block_length": block_length}
        fallback = {"gen_length": 256, "steps": 256, "block_length": 8}
        if model_family(self.model) == "Dream":  # Dream's sampler has no blocks
            fallback.pop("block_length")
        sampler = sampler_settings(
            self.model, {k: None if _optional(v) is None else int(v) for k, v in given.items()}, fallback=fallback
        )
        self.gen_kwargs = {
            "gen_length": int(sampler["gen_length"]),
            "steps": int(sampler["steps"]),
            "block_length": sampler.get("block_length"),
            "temperature": float(temperature),
            "cfg_scale": float(cfg),
            "remasking": alg if remasking is None else remasking,
            "threshold": None if _optional(threshold) is None else float(threshold),
            "noise_rule": noise_rule,
            "till_eos": _bool_or_none(till_eos),
            "cache": _optional(cache),
            "alg_temp": None if _optional(alg_temp) is None else float(alg_temp),
            "top_p": None if _optional(top_p) is None else float(top_p),
            "top_k": None if _optional(top_k) is None else int(top_k),
            "eps": float(eps),
            "schedule": _optional(schedule),
        }
        self.mc_num, self.mc_batch_size, self.cfg = int(mc_num), int(mc_batch_size), float(cfg)
        self.is_check_greedy = bool(_bool_or_none(is_check_greedy))
        limit = _optional(max_length)
        config_limit = getattr(self.model.config, "max_sequence_length", None)
        self.max_length = int(limit) if limit is not None else int(config_limit or 4096)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.pad_id = pad_token_for(self.tokenizer, self.mask_id)

    # -- lm-eval plumbing -------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        """Token ids; special tokens (e.g. BOS) are added unless the text already starts with BOS (a chat
        template was applied) or ``add_special_tokens`` says otherwise."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list[Any]]:
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()

    # -- requests ---------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = []
        for (context, continuation), prefix, target in tqdm(
            requests, desc="loglikelihood", disable=disable_tqdm or self.rank != 0
        ):
            prefix = prefix[-max(1, self.max_length - len(target)) :]
            ll = mc_loglikelihood(
                self.model,
                prefix,
                target,
                mc_num=self.mc_num,
                batch_size=self.mc_batch_size,
                cfg_scale=self.cfg,
                mask_token_id=self.mask_id,
                generator=self.generator,
            )
            greedy = self._is_greedy(prefix, target) if self.is_check_greedy else False
            results.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (ll, greedy))
        return results

    def _is_greedy(self, prefix: list[int], target: list[int]) -> bool:
        """Whether greedy decoding with one token per step (LLaDA's suffix check) reproduces the continuation."""
        ids = torch.tensor([prefix], device=self._device)
        out = generate(
            self.model,
            ids,
            gen_length=len(target),
            steps=len(target),
            cfg_scale=self.cfg,
            till_eos=False,
            schedule="linear",  # one token per step, also for Dream
            mask_token_id=self.mask_id,
            max_length=self.max_length,
        )
        return out[0, len(prefix) :].tolist() == list(target)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "loglikelihood_rolling (perplexity tasks such as wikitext) is not defined for masked diffusion LMs; "
            "use generation or multiple-choice tasks."
        )

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        gen_length = self.gen_kwargs["gen_length"]
        keep = max(1, self.max_length - gen_length)
        prompts = [self.tok_encode(context)[-keep:] for context, _ in (r.args for r in requests)]
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        texts: list[Optional[str]] = [None] * len(requests)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with memoize_cores(self.model):  # a NaRA hypernetwork runs once per distinct λ over all requests
            for chunk in tqdm(batches, desc="generate_until", disable=disable_tqdm or self.rank != 0):
                ids, mask = left_pad([prompts[i] for i in chunk], self.pad_id, self._device)
                out = generate(
                    self.model,
                    ids,
                    attention_mask=mask,
                    mask_token_id=self.mask_id,
                    max_length=self.max_length,
                    generator=self.generator,
                    **self.gen_kwargs,
                )
                for row, i in enumerate(chunk):
                    context, gen_kwargs = requests[i].args
                    text = _cut_at_stops(
                        decode_generation(self.tokenizer, out[row, ids.shape[1] :].tolist(), self.stop_ids),
                        _stop_strings(gen_kwargs),
                    )
                    texts[i] = text
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return texts


def _register() -> None:
    """``@register_model("nara_llada", "nara_dream")``, each name skipped when already taken (the module imported
    twice, e.g. once as ``__main__``)."""
    names = [name for name in (MODEL_NAME, *MODEL_ALIASES) if name not in model_registry]
    if names:
        register_model(*names)(NaRALLaDA)


_register()


def _stop_strings(gen_kwargs: Any) -> list[str]:
    until = gen_kwargs.get("until", []) if isinstance(gen_kwargs, dict) else []
    if isinstance(until, str):
        until = [until]
    return [s for s in until if s]


def _cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def main() -> None:
    """``nara-lm-eval``: lm-eval's command line with ``nara_llada`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
