"""Masked-diffusion SFT of a LLaDA or Dream model with NaRA, NaRA-C, LoRA or full fine-tuning: the whole run.

The family comes from the model's config (``model_type`` ``llada`` or ``Dream``) and brings its conventions: the mask
token (``config.mask_token_id``), the logits shift (Dream predicts position i from position i−1; applied by
`nara_diffusion.text.objectives.logits_at`), the chat template (the tokenizer's) and its module names (the recipes'
LLaDA names ``attn_out`` / ``ff_proj`` / ``ff_out`` are mapped to Dream's ``o_proj`` / ``gate_proj`` / ``down_proj``).

``examples/llada/finetune.py`` is a thin wrapper over `run_finetune`; the same function serves scripts of your own::

    from nara_diffusion.text.finetune import FinetuneConfig, run_finetune
    run_finetune(FinetuneConfig(model="GSAI-ML/LLaDA-8B-Instruct", dataset="math_14k.json", epochs=10))

``adapter="multi-lora"`` with ``bins=K`` trains the paper's noise-bin baseline: K peft LoRA adapters, the k-th trained
only on examples whose noise level t falls in its bin ((k−1)/K, k/K]. This is done by drawing t ~ U of the bin (above
``mask_eps``) for adapter k, which is exactly the training distribution conditioned on t ∈ bin k (rejection sampling
from t ~ U(ε, 1) would give the same examples, K times more slowly). The adapters are trained one after another, each
a complete LoRA run with the full step budget (so K times the compute of one LoRA) in ``<output_dir>/noise_bin_<k>/``;
``<output_dir>/final/`` (and ``best/``) then gather them as ``noise_bin_1 … noise_bin_K`` sub-folders, the layout
`nara_diffusion.text.loading.load_adapter` loads and `nara_diffusion.text.generate` switches between.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate.utils import set_seed
from torch import nn

from ..core.model_card import finish_adapter_folder, hub_base_model
from ..selection.diffora import SelectionConfig, select_before_training
from ..training import ADAPTERS, TrainConfig, Trainer, TrainResult, attach_adapter
from ..training.config import check_float, check_int, describe, option
from ..training.hub import push_folder_to_hub
from ..training.loop import has_started
from . import dream, llada  # noqa: F401  (register the "llada" and "Dream" model types with the Auto classes)
from .data import SFTSplits, collate_sft, load_records, load_sft_data
from .loading import DTYPES, load_adapter, load_base_model
from .masking import DEFAULT_EPS, MASKING_MODES
from .model_info import family_target_modules, logits_shift, model_family, resolve_mask_token_id
from .noise_bins import gather_noise_bins, noise_bin_bounds, noise_bin_name, sample_t_in_bin
from .objectives import LIFT_POLICIES, LIFT_VARIANTS, RHO_DISTRIBUTIONS, gift_loss, lift_sft_loss, sft_loss
from .scoring import ANSWER_KINDS, GenerationEval, evaluate_generation
from .trained_sampling import sampling_record, set_trained_sampling, write_sampling_record

logger = logging.getLogger(__name__)

MULTI_LORA = "multi-lora"
OBJECTIVES = ("vanilla", "lift", "gift")
FINETUNE_ADAPTERS = (*ADAPTERS, MULTI_LORA)


@dataclass
class FinetuneConfig(SelectionConfig, TrainConfig):
    """Everything a fine-tuning run needs: the model, the data, the adapter and the `TrainConfig` settings.

    The defaults are the NaRA authors' math14k recipe where it applies (r 32, η 0.1, q/k/v/attn_out,
    max_length 512, lr 1e-4, effective batch 32).
    """

    model: str = option(
        "GSAI-ML/LLaDA-8B-Instruct",
        help="Base masked-diffusion LM (LLaDA or Dream, told apart by its config): Hub id or local folder.",
        aliases=["pretrained_model_name_or_path"],
    )
    dataset: str = option(
        "", help="Training data: a .json/.jsonl file (chat or LLM-Adapters records) or a Hub dataset name."
    )
    prompt_column: Optional[str] = option(None, help="Column of the prompt (none: guessed from the records).")
    answer_column: Optional[str] = option(None, help="Column of the answer (none: guessed from the records).")
    input_column: Optional[str] = option(None, help="Column of an extra input appended to the prompt (none: no such).")
    max_length: int = option(512, help="Tokens per training example (prompt + answer), longer ones truncated.")
    val_size: int = option(128, help="Training examples held out for the validation loss (0: no validation set).")
    val_seed: int = option(42, help="Seed of the validation split.")
    adapter: str = option(
        "nara",
        help="Adapter kind: NaRA, NaRA-C (constant core), peft's LoRA, full fine-tuning or the noise-bin "
        "Multi-LoRA baseline (needs --bins).",
        choices=FINETUNE_ADAPTERS,
    )
    bins: Optional[int] = option(None, help="K, the number of noise bins, for --adapter multi-lora only.")
    r: int = option(32, help="Adapter rank (NaRAConfig.r; LoRA's r).", aliases=["rank"])
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "attn_out"],
        metadata=describe(
            "Module names to adapt (space- or comma-separated), or all-linear; LLaDA's names are mapped to Dream's."
        ),
    )
    core_scale: float = option(0.1, help="NaRA's η: C(λ) = I + η·F(λ).")
    lora_dropout: float = option(0.05, help="Dropout on the adapter's input.")
    scaling: float = option(1.0, help="Scale s of the adapter's branch (LoRA: alpha = scaling × rank).")
    masking: str = option("uniform", help="How masked positions are drawn at noise level t.", choices=MASKING_MODES)
    mask_eps: float = option(DEFAULT_EPS, help="Smallest noise level: t ~ U(mask_eps, 1).")
    dtype: str = option("float32", help="Dtype of the base model's weights.", choices=tuple(DTYPES))
    load_in_4bit: bool = option(False, help="Load the base model in 4 bits (QLoRA; needs bitsandbytes and CUDA).")
    objective: str = option(
        "vanilla",
        help="Which tokens are supervised: LLaDA's SFT, LIFT or GIFT (text/objectives.py).",
        choices=OBJECTIVES,
    )
    lift_variant: str = option("lift3", help="LIFT variant (objective lift).", choices=LIFT_VARIANTS)
    lift_policy: str = option("time", help="LIFT token-selection policy (objective lift).", choices=LIFT_POLICIES)
    lift_rho: str = option("code", help="LIFT's ρ distribution (objective lift).", choices=RHO_DISTRIBUTIONS)
    lift_vanilla_coef: float = option(3.0, help="Weight of the vanilla term in LIFT's loss.")
    approximate: bool = option(False, help="LIFT: approximate token scores with the masked forward (cheaper).")
    hidden_dims: list[int] = field(
        default_factory=lambda: [256, 512],
        metadata=describe("Widths of NaRA's hypernetwork layers (NaRAConfig.hidden_dims)."),
    )
    test_dataset: str = option(
        "",
        help="Test records whose generated answers are scored before and after training "
        "(<output_dir>/test_before.jsonl, test_after.jsonl); empty: no test.",
    )
    test_size: Optional[int] = option(None, help="Score the first N test records only (none: all).")
    test_kind: str = option("auto", help="Answer format of the test set (text/scoring.py).", choices=ANSWER_KINDS)
    test_gen_length: Optional[int] = option(
        None,
        help="Tokens generated per test answer (none: the answer positions training fills, max_length minus the "
        "median prompt; another value warns).",
    )
    test_steps: Optional[int] = option(None, help="Reverse steps per test answer (none: the test generation length).")
    test_block_length: Optional[int] = option(
        None, help="Semi-autoregressive block length of the test sampler (none: one block, as trained)."
    )
    test_batch_size: int = option(8, help="Test prompts per sampler batch.")

    def validate(self) -> None:
        """Raise ValueError, naming the flag, for settings no run can use (see `TrainConfig.validate`)."""
        super().validate()
        if not self.dataset:
            raise ValueError("No dataset: pass --dataset <file.json|file.jsonl|hub name>.")
        check_int("max_length", self.max_length, 1)
        check_int("val_size", self.val_size, 0, hint=" (0: no validation set)")
        check_int("val_seed", self.val_seed, 0)
        check_int("r", self.r, 1)
        check_float("core_scale", self.core_scale, 0.0)
        check_float("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        check_float("scaling", self.scaling, 0.0, low_open=True)
        check_float("mask_eps", self.mask_eps, 0.0, 1.0, low_open=True, high_open=True)
        check_float("lift_vanilla_coef", self.lift_vanilla_coef)
        for width in self.hidden_dims:
            check_int("hidden_dims", width, 1)
        check_int("test_gen_length", self.test_gen_length, 1, optional=True)
        check_int("test_steps", self.test_steps, 1, optional=True)
        check_int("test_block_length", self.test_block_length, 1, optional=True)
        check_int("test_batch_size", self.test_batch_size, 1)
        if self.select:
            check_int("search_steps", self.search_steps, 1)
            check_float("alpha_lr", self.alpha_lr, 0.0, low_open=True)
        if self.adapter not in FINETUNE_ADAPTERS:
            raise ValueError(f"adapter must be one of {', '.join(FINETUNE_ADAPTERS)}, got {self.adapter!r}.")
        if self.adapter == MULTI_LORA:
            if self.bins is None or self.bins < 1:
                raise ValueError(
                    f"adapter=multi-lora needs the number of noise bins: pass --bins K (K >= 1), got {self.bins}."
                )
            if self.mask_eps >= 1.0 / self.bins:
                raise ValueError(
                    f"With {self.bins} bins the first bin (0, {1 / self.bins:g}] lies below mask_eps={self.mask_eps}; "
                    "use fewer bins or a smaller mask_eps."
                )
        elif self.bins is not None:
            raise ValueError(f"bins applies only to adapter=multi-lora (adapter is {self.adapter!r}).")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.")
        if self.objective != "vanilla" and self.adapter == MULTI_LORA:
            raise ValueError("adapter=multi-lora trains each bin on its own noise levels; use objective=vanilla.")
        self.check_selection()
        if self.select and self.adapter not in ("nara", "nara-c", "lora"):
            raise ValueError(f"select=diffora chooses modules for an adapter; it does not apply to {self.adapter!r}.")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {', '.join(MASKING_MODES)}, got {self.masking!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.test_kind not in ANSWER_KINDS:
            raise ValueError(f"test_kind must be one of {', '.join(ANSWER_KINDS)}, got {self.test_kind!r}.")
        if self.test_size is not None and self.test_size < 1:
            raise ValueError(f"test_size must be >= 1 (or none for the whole test set), got {self.test_size}.")
        steps = self.test_steps or self.test_gen_length
        if self.test_gen_length is None or self.test_block_length is None:
            pass  # checked by the sampler, once the trained length is known
        elif self.test_gen_length % self.test_block_length or not 1 <= steps <= self.test_gen_length:
            raise ValueError(
                f"test_block_length ({self.test_block_length}) must divide test_gen_length ({self.test_gen_length}) "
                f"and 1 <= test_steps <= test_gen_length (got {steps})."
            )


def _masked_diffusion_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    *,
    mask_token_id: int,
    config: Any,
    noise_bin: Optional[int] = None,
) -> torch.Tensor:
    ids = batch["input_ids"]
    if config.objective == "lift":
        return lift_sft_loss(
            model,
            ids,
            batch["prompt_lengths"],
            mask_token_id=mask_token_id,
            generator=generator,
            eps=config.mask_eps,
            mode=config.masking,
            variant=config.lift_variant,
            policy=config.lift_policy,
            rho_dist=config.lift_rho,
            vanilla_coef=config.lift_vanilla_coef,
            approximate=config.approximate,
        )
    if config.objective == "gift":
        return gift_loss(
            model,
            ids,
            batch["prompt_lengths"],
            mask_token_id=mask_token_id,
            pad_token_id=config_pad_token_id(model),
            generator=generator,
            eps=config.mask_eps,
        )
    t = None
    if noise_bin is not None:  # one adapter of a noise-bin set: only noise levels of its bin
        t = sample_t_in_bin(
            ids.shape[0], noise_bin, config.bins, eps=config.mask_eps, generator=generator, device=ids.device
        )
    return sft_loss(
        model,
        ids,
        batch["prompt_lengths"],
        mask_token_id=mask_token_id,
        generator=generator,
        eps=config.mask_eps,
        mode=config.masking,
        t=t,
    ).loss


def _save_with_tokenizer(
    model: nn.Module,
    folder: Path,
    tokenizer: Any,
    sampling: dict[str, Any],
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """An adapter folder: the weights, the tokenizer and ``sampling.json`` (the generation length trained for).
    ``state_dict``: the gathered full state under FSDP / ZeRO-3 (see `Trainer`)."""
    model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(folder)
    write_sampling_record(folder, sampling)


def run_finetune(config: FinetuneConfig, model: Optional[nn.Module] = None, tokenizer: Any = None) -> TrainResult:
    """Load the base model and data, attach the adapter and train; returns where the weights were written.

    ``model``/``tokenizer`` may be given directly (then ``config.model`` is not loaded). Everything random (the
    adapter's initial weights, DiffoRA's search, dropout, masking) follows from ``config.seed`` alone.
    """
    config.validate()  # before anything loads, also for a config changed after construction
    set_seed(config.seed)
    if model is None or tokenizer is None:
        model, tokenizer = load_base_model(config.model, config.dtype, config.load_in_4bit)
    mask_token_id = resolve_mask_token_id(model)
    logger.info(
        "model family %s: mask token %d, logits shift %d", model_family(model), mask_token_id, logits_shift(model)
    )
    splits = load_sft_data(
        config.dataset,
        tokenizer,
        max_length=config.max_length,
        prompt_column=config.prompt_column,
        answer_column=config.answer_column,
        input_column=config.input_column,
        val_size=config.val_size,
        seed=config.val_seed,
    )
    sampling = sampling_record(splits.train)
    test_records = load_records(config.test_dataset)[: config.test_size] if config.test_dataset else None
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    before = _test(model, tokenizer, test_records, config, "before", sampling)
    if config.adapter == MULTI_LORA:
        result = _run_noise_bins(config, model, tokenizer, splits, mask_token_id, sampling)
        trained = load_adapter(model, result.final_dir) if before is not None else model
        after = _test(trained, tokenizer, test_records, config, "after", sampling)
        result = _with_test_metrics(result, before, after)
        return _publish(result, config, None)
    options: dict[str, Union[float, str, list[int]]] = {}
    if config.adapter.startswith("nara"):
        options["core_scale"] = config.core_scale
        options["hidden_dims"] = list(config.hidden_dims)
    set_seed(config.seed)  # the adapter and the search start from the seed, whatever ran before (e.g. the test)
    model = attach_adapter(
        model,
        config.adapter,
        r=config.r,
        target_modules=_targets(model, config),
        lora_dropout=config.lora_dropout,
        scaling=config.scaling,
        **options,
    )
    loss_fn = partial(_masked_diffusion_step, mask_token_id=mask_token_id, config=config)
    if config.select == "diffora":
        _select_modules(model, splits, loss_fn, config)
    trainer = Trainer(
        model,
        config,
        splits.train,
        splits.val,
        collate_sft,
        loss_fn,
        save_fn=partial(_save_with_tokenizer, tokenizer=tokenizer, sampling=sampling),
    )
    if trainer.accelerator.is_main_process and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    logger.info("%d training / %d validation examples", len(splits.train), len(splits.val or []))
    result = trainer.train()
    set_trained_sampling(model, sampling)
    result = _with_test_metrics(result, before, _test(model, tokenizer, test_records, config, "after", sampling))
    return _publish(result, config, model)


def _publish(result: TrainResult, config: FinetuneConfig, model: Optional[nn.Module]) -> TrainResult:
    """On the main process: NaRA's card in ``final/`` with what the run measured (data, steps, test scores; the
    base model by its Hub id only), then with ``push_to_hub`` the upload of ``final/``."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        if model is not None and config.adapter in ("nara", "nara-c"):
            facts: dict[str, Any] = {"data": _data_name(config.dataset), "steps": result.global_step}
            if result.metrics:
                facts["scores"] = dict(result.metrics)
            finish_adapter_folder(model, result.final_dir, base_model=hub_base_model(config.model), extra=facts)
        if config.push_to_hub:
            repo = push_folder_to_hub(result.final_dir, config.hub_model_id, base_model=config.model)
            logger.info("Uploaded %s to https://huggingface.co/%s", result.final_dir, repo)
    state.wait_for_everyone()
    return result


def _data_name(dataset: str) -> str:
    """A dataset as the card may name it: a Hub name as given, a local file by its file name only."""
    return Path(dataset).name if Path(dataset).expanduser().exists() else dataset


def _test(
    model: nn.Module,
    tokenizer: Any,
    records: Optional[list[dict[str, Any]]],
    config: FinetuneConfig,
    when: str,
    sampling: dict[str, Any],
) -> Optional[GenerationEval]:
    """Accuracy on the test records (main process only), written to ``<output_dir>/test_<when>.jsonl``; sampled
    at the trained length (``sampling``) unless the config says otherwise."""
    if records is None:
        return None
    from accelerate import PartialState

    state = PartialState()
    result = None
    if state.is_main_process:
        was_training = model.training
        model.to(state.device).eval()
        result = evaluate_generation(
            model,
            tokenizer,
            records,
            kind=config.test_kind,
            prompt_column=config.prompt_column,
            answer_column=config.answer_column,
            batch_size=config.test_batch_size,
            progress=True,
            **_test_sampler(config, sampling, semi_autoregressive=model_family(model) != "Dream"),
        )
        model.train(was_training)
        result.write_jsonl(Path(config.output_dir) / f"test_{when}.jsonl")
        logger.info("test accuracy %s training: %.4f (%d/%d)", when, result.accuracy, result.correct, result.total)
    state.wait_for_everyone()
    return result


def _test_sampler(config: FinetuneConfig, sampling: dict[str, Any], semi_autoregressive: bool = True) -> dict[str, Any]:
    """The test sampler's settings: the config's, else the trained length in one block, one token per step (also for
    the base model before training, so that before and after sample the same canvas); a configured length is cut
    into LLaDA's blocks of 8 when ``semi_autoregressive`` (Dream's sampler runs one block). A configured length other
    than the trained one warns when the trained adapter is tested (`sampler_settings`)."""
    gen_length = config.test_gen_length or int(sampling["gen_length"])
    block_length = config.test_block_length
    if block_length is None:
        blocks_of_8 = semi_autoregressive and config.test_gen_length is not None and gen_length % 8 == 0
        block_length = 8 if blocks_of_8 else gen_length
    return {"gen_length": gen_length, "steps": config.test_steps or gen_length, "block_length": block_length}


def _with_test_metrics(
    result: TrainResult, before: Optional[GenerationEval], after: Optional[GenerationEval]
) -> TrainResult:
    for when, evaluation in (("before", before), ("after", after)):
        if evaluation is not None:
            result.metrics[f"test_accuracy_{when}"] = evaluation.accuracy
    return result


def _run_noise_bins(
    config: FinetuneConfig,
    model: nn.Module,
    tokenizer: Any,
    splits: SFTSplits,
    mask_token_id: int,
    sampling: dict[str, Any],
) -> TrainResult:
    """Train the K LoRA adapters of a noise-bin set one after another (see the module docstring)."""
    root = Path(config.output_dir)
    results: list[TrainResult] = []
    for index in range(1, config.bins + 1):
        name = noise_bin_name(index)
        resume = config.resume and has_started(root / name)  # a bin not started yet starts afresh
        bin_config = dataclasses.replace(config, output_dir=str(root / name), resume=resume)
        set_seed(config.seed)  # each bin's adapter starts from the seed alone
        peft_model = attach_adapter(
            model,
            "lora",
            r=config.r,
            target_modules=_targets(model, config),
            lora_dropout=config.lora_dropout,
            scaling=config.scaling,
        )
        logger.info("noise bin %d/%d: t in (%g, %g]", index, config.bins, *noise_bin_bounds(index, config.bins))
        trainer = Trainer(
            peft_model,
            bin_config,
            splits.train,
            splits.val,
            collate_sft,
            partial(_masked_diffusion_step, mask_token_id=mask_token_id, config=config, noise_bin=index),
            save_fn=partial(_save_with_tokenizer, tokenizer=tokenizer, sampling=sampling),
        )
        results.append(trainer.train())
        model = peft_model.unload()  # the untouched base again, for the next bin
    if trainer.accelerator.is_main_process:
        gather_noise_bins(root / "final", [r.final_dir for r in results], tokenizer)
        write_sampling_record(root / "final", sampling)
        if all(r.best_dir is not None for r in results):
            gather_noise_bins(root / "best", [r.best_dir for r in results], tokenizer)
            write_sampling_record(root / "best", sampling)
    trainer.accelerator.wait_for_everyone()
    losses = [r.best_val_loss for r in results]
    best = (root / "best") if all(r.best_dir is not None for r in results) else None
    return TrainResult(
        global_step=sum(r.global_step for r in results),
        best_val_loss=None if None in losses else sum(losses) / len(losses),  # equal-width bins: the mean is E_t
        final_dir=root / "final",
        best_dir=best,
    )


def _targets(model: nn.Module, config: FinetuneConfig) -> Union[list[str], str]:
    """The modules to adapt, in the model family's names; ``all-linear`` (alone) as peft's string."""
    if list(config.target_modules) == ["all-linear"]:
        return "all-linear"
    return family_target_modules(model, config.target_modules)


def config_pad_token_id(model: nn.Module) -> Optional[int]:
    """The padding id of a (possibly wrapped) model's config, which GIFT leaves out of the response."""
    config = getattr(model, "config", None)
    return getattr(config, "pad_token_id", None)


def _select_modules(model: nn.Module, splits: SFTSplits, loss_fn: Any, config: FinetuneConfig) -> None:
    """DiffoRA before the main run, on a seeded held-out split of the training set."""
    from accelerate import PartialState

    device = PartialState().device
    model.to(device)
    kept = select_before_training(
        model, splits.train, collate_sft, partial(_on_device, loss_fn=loss_fn, device=device), config
    )
    logger.info("DiffoRA kept %d modules", len(kept))


def _on_device(model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, *, loss_fn, device):
    return loss_fn(model, {k: v.to(device) for k, v in batch.items()}, generator)
