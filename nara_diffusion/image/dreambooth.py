"""DreamBooth fine-tuning of an SDXL (or SD 1.5 / 2.x) UNet, or an SD3 / Flux transformer, with NaRA, NaRA-C or
peft's LoRA: the whole run.

``examples/sdxl_dreambooth/train.py`` is a thin wrapper over `run_dreambooth`; the same function serves scripts of
your own::

    from nara_diffusion.image.dreambooth import DreamBoothConfig, run_dreambooth
    run_dreambooth(DreamBoothConfig(instance_data_dir="dog/", instance_prompt="a photo of sks dog"))

One training step (`DreamBoothModel.forward`): draw latents from the cached VAE posterior of each image, a
timestep t ~ U{0, …, T−1} and Gaussian noise per example, noise the latents with the training scheduler, predict
with the UNet (SDXL: with the pooled text embedding and the micro-conditioning time ids), and regress the
scheduler's target (ε or v) with MSE, optionally Min-SNR weighted; with prior preservation the class half of the
batch adds ``prior_loss_weight`` × its own MSE. NaRA reads λ = t/T of each example from the UNet's ``timestep``;
NaRA text encoders get the same λ. SD3 and Flux pipelines train their transformer with the flow-matching objective
of diffusers' SD3 / Flux DreamBooth scripts (`nara_diffusion.image.flow_matching`, λ = σ per example); the family
is read from the pipeline (`FlowMatchingRecipe`, `UNetRecipe`), the script and flags are the same.

Defaults follow diffusers' SDXL DreamBooth-LoRA recipe (README_sdxl.md): rank 4, learning rate 1e-4 constant with
no warm-up, 500 updates of batch 1 with 4 accumulation steps, AdamW (0.9, 0.999, weight decay 1e-4), gradient
clipping at 1.0, no adapter dropout, seed 0, resolution 1024.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate.utils import set_seed
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from diffusers.utils import make_image_grid
from torch import nn

from ..core import noise_level
from ..core.folders import PIPELINE_WEIGHTS_NAME
from ..core.model_card import hub_base_model
from ..core.tuner import inplace_tuner
from ..selection.diffora import SelectionConfig, select_before_training
from ..training import TrainConfig, Trainer, TrainResult, build_accelerator
from ..training.adapters import adapter_config
from ..training.config import check_float, check_int, check_model_path, config_to_dict, describe, option, retune
from ..training.hub import push_folder_to_hub
from .data import DreamBoothDataset, check_resolution, collate_dreambooth, list_images
from .denoisers import denoiser_of, family_of
from .flow_matching import WEIGHTING_SCHEMES, FlowMatchingModel
from .loaders import enable_nara_loading, save_nara_weights
from .prompts import disable_per_step_prompt_encoding, enable_per_step_prompt_encoding
from .unet import (
    TEXT_ENCODER_TARGET_MODULES,
    UNET_TARGET_MODULES,
    checkpoint_text_encoders,
    inject_nara,
    needs_noise_level,
    unet_reader,
)

logger = logging.getLogger(__name__)

DREAMBOOTH_ADAPTERS = ("nara", "nara-c", "lora")
EXAMPLE_PIPELINE = "stabilityai/stable-diffusion-xl-base-1.0"
TRAINING_CONFIG_NAME = "training_config.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name, for --adapter lora
VALIDATION_DIR = "validation"


@dataclass
class DreamBoothConfig(SelectionConfig, TrainConfig):
    """Everything a DreamBooth run needs: base pipeline, images, prompts, adapter, objective, validation.

    The `TrainConfig` fields keep their names (``learning_rate``, ``max_steps``, ``batch_size``, ``grad_accum``,
    ``eval_every`` = checkpoint period, ``mixed_precision``, ``gradient_checkpointing``, ``resume``, ...) with the
    diffusers recipe's values as defaults; the DreamBooth fields use diffusers' names.
    """

    # base pipeline
    model: str = option(
        EXAMPLE_PIPELINE,
        help="Base pipeline (SDXL, SD 1.5 / 2.x): Hub id or local folder.",
        aliases=["pretrained_model_name_or_path"],
    )
    vae: Optional[str] = option(
        None,
        help="Replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix (then the VAE may run in half precision).",
        aliases=["pretrained_vae_model_name_or_path"],
    )
    variant: Optional[str] = option(None, help='Weight-file variant of the base pipeline, e.g. "fp16".')
    # data
    instance_data_dir: str = option("", help="Folder of the subject's photos.")
    instance_prompt: str = option("", help='Prompt naming the subject, e.g. "a photo of sks dog".')
    class_data_dir: Optional[str] = option(
        None, help="Folder of class images for prior preservation (none: <output_dir>/class_images)."
    )
    class_prompt: Optional[str] = option(None, help='Prompt of the class, e.g. "a photo of a dog".')
    with_prior_preservation: bool = option(False, help="Add the prior-preservation loss on class images.")
    prior_loss_weight: float = option(1.0, help="Weight of the prior-preservation loss.")
    num_class_images: int = option(100, help="Class images to use; missing ones are generated by the base model.")
    sample_batch_size: int = option(4, help="Batch size when generating class images.")
    resolution: int = option(1024, help="Training resolution in pixels (images are resized and cropped to it).")
    center_crop: bool = option(False, help="Crop the centre of each image (else a random crop).")
    random_flip: bool = option(False, help="Flip images horizontally at random.")
    # adapter
    adapter: str = option(
        "nara", help="Adapter kind: NaRA, NaRA-C (constant core) or peft's LoRA.", choices=DREAMBOOTH_ADAPTERS
    )
    r: int = option(4, help="Adapter rank (NaRAConfig.r; LoRA's r).", aliases=["rank"])
    target_modules: list[str] = field(
        default_factory=lambda: list(UNET_TARGET_MODULES),
        metadata=describe("UNet modules to adapt (space- or comma-separated)."),
    )
    core_scale: float = option(0.1, help="NaRA's η: C(λ) = I + η·F(λ).")
    lora_dropout: float = option(0.0, help="Dropout on the adapter's input.")
    scaling: float = option(1.0, help="Scale s of the adapter's branch (LoRA: alpha = scaling × rank).")
    train_text_encoder: bool = option(False, help="Also adapt the text encoder(s).")
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: list(TEXT_ENCODER_TARGET_MODULES),
        metadata=describe("Text-encoder modules to adapt (with --train_text_encoder)."),
    )
    text_encoder_lr: float = option(5e-6, help="Learning rate of the text-encoder adapters.")
    text_encoder_weight_decay: float = option(1e-3, help="Weight decay of the text-encoder adapters.")
    # objective and optimiser
    snr_gamma: Optional[float] = option(None, help="Min-SNR weighting γ (5.0 is usual); none: plain MSE.")
    weighting_scheme: Optional[str] = option(
        None,
        help="SD3 / Flux: timestep density or loss weighting (none given: logit_normal for SD3, none for Flux).",
        choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = option(0.0, help="SD3 / Flux: mean of the logit_normal density.")
    logit_std: float = option(1.0, help="SD3 / Flux: standard deviation of the logit_normal density.")
    mode_scale: float = option(1.29, help="SD3 / Flux: scale of the mode density.")
    precondition_outputs: bool = option(True, help="SD3: regress the denoised latents x̂₀ = x_σ − σ·v̂ (diffusers' SD3).")
    flux_guidance: float = option(3.5, help="Flux: the guidance embedded in training (diffusers' --guidance_scale).")
    use_8bit_adam: bool = option(False, help="bitsandbytes' 8-bit AdamW (CUDA).")
    # validation and sampling
    validation_prompt: Optional[str] = option(None, help="Prompt of the validation grids (none: no grids).")
    num_validation_images: int = option(4, help="Images per validation grid.")
    validation_steps: int = option(50, help="Updates between validation grids (0: only after the last update).")
    num_inference_steps: int = option(25, help="Denoising steps of validation images and generated class images.")
    guidance_scale: float = option(5.0, help="Classifier-free guidance of validation and class images.")
    # TrainConfig fields with the DreamBooth recipe's defaults
    output_dir: str = retune(TrainConfig, "output_dir", "outputs/dreambooth")
    seed: int = retune(TrainConfig, "seed", 0)
    learning_rate: float = retune(TrainConfig, "learning_rate", 1e-4)
    max_steps: Optional[int] = retune(TrainConfig, "max_steps", 500)
    batch_size: int = retune(TrainConfig, "batch_size", 1)
    grad_accum: int = retune(TrainConfig, "grad_accum", 4)
    weight_decay: float = retune(TrainConfig, "weight_decay", 1e-4)
    adam_beta2: float = retune(TrainConfig, "adam_beta2", 0.999)
    warmup_ratio: float = retune(TrainConfig, "warmup_ratio", 0.0)
    lr_schedule: str = retune(TrainConfig, "lr_schedule", "constant")
    eval_every: int = retune(TrainConfig, "eval_every", 500)

    def validate(self) -> None:
        """Raise ValueError, naming the flag, for settings no run can use (see `TrainConfig.validate`)."""
        super().validate()
        if not self.instance_data_dir:
            raise ValueError("No instance images: pass --instance_data_dir <folder of images>.")
        if not self.instance_prompt:
            raise ValueError('No instance prompt: pass --instance_prompt "a photo of sks dog".')
        if self.adapter not in DREAMBOOTH_ADAPTERS:
            raise ValueError(f"adapter must be one of {', '.join(DREAMBOOTH_ADAPTERS)}, got {self.adapter!r}.")
        check_resolution(self.resolution)
        if self.with_prior_preservation:
            if not self.class_prompt:
                raise ValueError('Prior preservation needs --class_prompt (e.g. "a photo of a dog").')
            if self.class_data_dir is None:
                self.class_data_dir = str(Path(self.output_dir) / "class_images")
        if self.weighting_scheme is not None and self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {self.weighting_scheme!r}."
            )
        check_float("logit_std", self.logit_std, 0.0, low_open=True)
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 (or none), got {self.snr_gamma!r}.")
        self.check_selection()
        check_float("prior_loss_weight", self.prior_loss_weight, 0.0)
        check_int("num_class_images", self.num_class_images, 0)
        check_int("sample_batch_size", self.sample_batch_size, 1)
        check_int("r", self.r, 1)
        check_float("core_scale", self.core_scale, 0.0)
        check_float("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        check_float("scaling", self.scaling, 0.0, low_open=True)
        check_float("text_encoder_lr", self.text_encoder_lr, 0.0, low_open=True)
        check_float("text_encoder_weight_decay", self.text_encoder_weight_decay, 0.0)
        check_int("num_validation_images", self.num_validation_images, 1)
        check_int("validation_steps", self.validation_steps, 0, hint=" (0: only after the last update)")
        check_int("num_inference_steps", self.num_inference_steps, 1)
        check_float("guidance_scale", self.guidance_scale, 0.0)
        if self.select:
            check_int("search_steps", self.search_steps, 1)
            check_float("alpha_lr", self.alpha_lr, 0.0, low_open=True)


# -- the base pipeline --------------------------------------------------------------------------------------
def dtype_kwargs(dtype: Union[torch.dtype, dict[str, torch.dtype]]) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` from diffusers 0.40 on, ``torch_dtype`` before."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype": dtype}


def load_base_pipeline(
    model: str,
    vae: Optional[str] = None,
    variant: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: Optional[torch.dtype] = None,
) -> DiffusionPipeline:
    """Load a text-to-image pipeline (SDXL, SD 1.5 / 2.x, SD3, Flux), optionally with another VAE.

    Args:
        model: Hub id or folder of the pipeline.
        vae: Hub id or folder of a replacement VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``).
        variant: Weight file variant (e.g. ``"fp16"``).
        dtype: Dtype of the UNet and the text encoders.
        vae_dtype: Dtype of the VAE (default: ``dtype``).
    """
    vae_dtype = vae_dtype or dtype
    model = check_model_path(model, example=EXAMPLE_PIPELINE)
    vae = None if vae is None else check_model_path(vae, "vae", example="madebyollin/sdxl-vae-fp16-fix")
    pipe = DiffusionPipeline.from_pretrained(
        model, variant=variant, **dtype_kwargs({"default": dtype, "vae": vae_dtype})
    )
    try:
        recipe_for(pipe)
    except TypeError as err:
        raise ValueError(f"{model} is a {type(pipe).__name__}; {err}") from None
    if vae is not None:
        pipe.vae = AutoencoderKL.from_pretrained(vae, **dtype_kwargs(vae_dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_sdxl(unet: UNet2DConditionModel) -> bool:
    """SDXL-style UNets take the pooled text embedding and the micro-conditioning ids (``text_time``)."""
    return unet.config.addition_embed_type == "text_time"


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """``[N, L]`` token ids, padded and truncated to the tokenizer's ``model_max_length``, as pipelines do."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_tokens(
    text_encoders: list[nn.Module], token_ids: list[torch.Tensor], sdxl: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Prompt embeddings as the pipelines compute them (no classifier-free guidance, no clip skip).

    SDXL: the penultimate hidden states of both encoders, concatenated (``[N, L, D1 + D2]``), and the pooled
    projection of the last one (``[N, P]``). SD: the first encoder's last hidden state (``[N, L, D]``), no pooled.
    """
    if not sdxl:
        return text_encoders[0](token_ids[0].to(text_encoders[0].device))[0], None
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids, strict=True):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].dim() == 2:
            pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def text_encoders_of(pipe: Any) -> list[nn.Module]:
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]


def tokenizers_of(pipe: Any) -> list[Any]:
    return [tok for tok in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if tok is not None]


# -- the denoiser families: what a training step is --------------------------------------------------------
class UNetRecipe:
    """SDXL / SD 1.5 / 2.x: the UNet regresses ε or v on the DDPM schedule (`DreamBoothModel`), λ = t/T."""

    component = "unet"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def targets(self, config: DreamBoothConfig) -> list[str]:
        return list(config.target_modules)

    def latent_transform(self, vae: Any) -> tuple[Any, Any]:
        """``(shift, scale)``: latents are ``(z − shift) · scale``."""
        scaling = torch.tensor(float(vae.config.scaling_factor))
        if getattr(vae.config, "latents_mean", None) is not None:  # e.g. Playground v2.5
            shift = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
            return shift, scaling / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        return None, scaling

    def model(self, config: DreamBoothConfig, trained_encoders: list[nn.Module], vae: Any) -> nn.Module:
        """The `DreamBoothModel` of the run (prompt embeddings cached unless the text encoders train)."""
        pipe, unet = self.pipe, self.pipe.unet
        sdxl = is_sdxl(unet)
        prompts = [config.instance_prompt, config.class_prompt or config.instance_prompt]
        token_ids = [tokenize(tok, prompts) for tok in tokenizers_of(pipe)]
        cache: dict[str, Any] = {}
        if config.train_text_encoder:
            cache.update(text_encoders=trained_encoders, token_ids=token_ids)
        else:
            with torch.no_grad():
                embeds, pooled = encode_tokens(text_encoders_of(pipe), token_ids, sdxl)
            cache.update(prompt_embeds=embeds.float(), pooled_embeds=None if pooled is None else pooled.float())
        latent_shift, latent_scale = self.latent_transform(vae)
        return DreamBoothModel(
            unet,
            DDPMScheduler.from_config(pipe.scheduler.config),
            resolution=config.resolution,
            prior_loss_weight=config.prior_loss_weight,
            snr_gamma=config.snr_gamma,
            latent_shift=latent_shift,
            latent_scale=latent_scale,
            **cache,
        )


class FlowMatchingRecipe:
    """SD3 / Flux: the transformer regresses the flow-matching velocity (`FlowMatchingModel`), λ = σ; the default
    targets add the joint-attention context projections; prompt embeddings are cached, except SD3's CLIP encoders'
    part when they train (``--train_text_encoder``; T5 stays frozen, as in diffusers' SD3 script)."""

    component = "transformer"

    def __init__(self, pipe: Any, family: Any) -> None:
        self.pipe, self.family = pipe, family

    def targets(self, config: DreamBoothConfig) -> list[str]:
        if list(config.target_modules) == UNET_TARGET_MODULES:  # the default: the family's own
            return list(self.family.target_modules)
        return list(config.target_modules)

    def model(self, config: DreamBoothConfig, trained_encoders: list[nn.Module], vae: Any) -> nn.Module:
        pipe, device = self.pipe, self.pipe.transformer.device
        prompts = [config.instance_prompt, config.class_prompt or config.instance_prompt]
        with torch.no_grad(), contextlib.ExitStack() as stack:  # the pipeline's own encoding, as at inference
            for encoder in trained_encoders:  # any λ: only the T5 part is kept when the CLIP encoders train
                if needs_noise_level(encoder):
                    config_of = inplace_tuner(encoder).peft_config[inplace_tuner(encoder).active_adapters[0]]
                    highest = config_of.num_train_timesteps if config_of.noise_input == "timestep" else 1.0
                    stack.enter_context(noise_level(encoder, highest))
            if self.family.name == "sd3":
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompts, None, None, device=device, do_classifier_free_guidance=False
                )
                text_ids = None
            else:
                embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device=device)
        prompt_kwargs: dict[str, Any] = {"prompt_embeds": embeds.float(), "pooled_embeds": pooled.float()}
        if trained_encoders:  # SD3: the CLIP part is encoded at every step; T5's part is cached
            token_ids = [tokenize(tok, prompts) for tok in (pipe.tokenizer, pipe.tokenizer_2)]
            t5 = embeds[:, token_ids[0].shape[1] :].float()
            prompt_kwargs = {"text_encoders": trained_encoders, "token_ids": token_ids, "t5_embeds": t5}
        scheme = config.weighting_scheme or ("logit_normal" if self.family.name == "sd3" else "none")
        shift = float(vae.config.shift_factor or 0.0)
        return FlowMatchingModel(
            pipe.transformer,
            FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
            family=self.family.name,
            text_ids=text_ids,
            **prompt_kwargs,
            latent_shift=shift,
            latent_scale=float(vae.config.scaling_factor),
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
            prior_loss_weight=config.prior_loss_weight,
            weighting_scheme=scheme,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            precondition_outputs=config.precondition_outputs,
            guidance_scale=config.flux_guidance,
        )


def recipe_for(pipe: Any) -> Union[UNetRecipe, FlowMatchingRecipe]:
    """The training recipe of ``pipe``'s denoiser family.

    Raises:
        TypeError: not an SDXL / SD (UNet2DConditionModel), SD3 or Flux text-to-image pipeline.
    """
    expected = "DreamBooth here needs an SDXL / SD 1.5 / 2.x (UNet2DConditionModel), SD3 or Flux pipeline"
    try:
        name, denoiser = denoiser_of(pipe)
    except TypeError:
        raise TypeError(f"{expected}; {type(pipe).__name__} has neither a unet nor a transformer.") from None
    family = family_of(denoiser)
    if family is None or getattr(pipe, "text_encoder", None) is None:
        raise TypeError(f"{expected}; its {name} is a {type(denoiser).__name__}.")
    return UNetRecipe(pipe) if family.name == "unet" else FlowMatchingRecipe(pipe, family)


# -- class images for prior preservation --------------------------------------------------------------------
def generate_class_images(
    pipe: Any,
    class_dir: Path,
    class_prompt: str,
    num_class_images: int,
    *,
    resolution: int,
    batch_size: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    seed: int = 0,
    accelerator: Any = None,
) -> int:
    """Fill ``class_dir`` up to ``num_class_images`` images of ``class_prompt`` made by the base ``pipe``.

    Image ``i`` comes from a generator seeded with ``seed + i``, so the set does not depend on the number of
    processes (which share the work). Returns how many images were generated (on this process).
    """
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in class_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    todo = list(range(len(existing), num_class_images))
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has counted before any writes
    if not todo:
        return 0
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    share = contextlib.nullcontext(todo) if accelerator is None else accelerator.split_between_processes(todo)
    autocast = contextlib.nullcontext() if accelerator is None else accelerator.autocast()
    done = 0
    with share as mine, autocast, torch.no_grad():
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            images = pipe(
                [class_prompt] * len(indices),
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator(device).manual_seed(seed + i) for i in indices],
            ).images
            for index, image in zip(indices, images, strict=True):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                digest = hashlib.sha1(buffer.getvalue()).hexdigest()[:10]
                (class_dir / f"class-{index:05d}-{digest}.png").write_bytes(buffer.getvalue())
                done += 1
    logger.info("Generated %d class images in %s", done, class_dir)
    return done


# -- the model the Trainer trains ----------------------------------------------------------------------------
class DreamBoothModel(nn.Module):
    """The UNet (and the text encoders when they are trained) with the DreamBooth loss as its forward.

    Args:
        unet: The UNet, with its adapter attached.
        noise_scheduler: The training scheduler (``DDPMScheduler`` from the pipeline's scheduler config).
        resolution: Training resolution (the micro-conditioning target size).
        prior_loss_weight: Weight of the class examples' loss.
        snr_gamma: Min-SNR γ, or None.
        latent_shift, latent_scale: Latents are ``(z - shift) · scale`` (SDXL: 0 and ``vae.config.scaling_factor``).
        prompt_embeds, pooled_embeds: Cached embeddings of ``[instance prompt, class prompt]`` (frozen encoders):
            ``[2, L, D]`` and ``[2, P]``.
        text_encoders, token_ids: The trained encoders and, per encoder, the ``[2, L]`` token ids of the prompts.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        *,
        resolution: int,
        prior_loss_weight: float = 1.0,
        snr_gamma: Optional[float] = None,
        latent_shift: Optional[torch.Tensor] = None,
        latent_scale: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_embeds: Optional[torch.Tensor] = None,
        text_encoders: Optional[list[nn.Module]] = None,
        token_ids: Optional[list[torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        if (prompt_embeds is None) == (text_encoders is None):
            raise ValueError("Give either cached prompt embeddings or the text encoders to train, not both.")
        self.unet = unet
        self.component = "unet"
        self.noise_scheduler = noise_scheduler
        self.resolution, self.prior_loss_weight, self.snr_gamma = resolution, prior_loss_weight, snr_gamma
        self.sdxl = is_sdxl(unet)
        self.text_encoders = nn.ModuleList(text_encoders or [])
        self.register_buffer("latent_shift", torch.zeros(()) if latent_shift is None else latent_shift, False)
        self.register_buffer("latent_scale", torch.ones(()) if latent_scale is None else latent_scale, False)
        self.register_buffer("prompt_embeds", prompt_embeds, False)
        self.register_buffer("pooled_embeds", pooled_embeds, False)
        self.num_token_ids = len(token_ids or [])
        for i, ids in enumerate(token_ids or []):  # one buffer per tokenizer (their lengths may differ)
            self.register_buffer(f"token_ids_{i}", ids, False)

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Activation checkpointing in the UNet and the trained text encoders (called by the `Trainer`)."""
        self.unet.enable_gradient_checkpointing()
        checkpoint_text_encoders(self.text_encoders)

    def encode_prompts(
        self, is_class: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Embeddings of each example's prompt (instance or class): ``[N, L, D]`` and ``[N, P]`` (SDXL).

        Trained NaRA text encoders are conditioned on each example's own timestep, like the UNet.
        """
        which = is_class.long()
        if self.prompt_embeds is not None:
            pooled = None if self.pooled_embeds is None else self.pooled_embeds[which]
            return self.prompt_embeds[which], pooled
        value = unet_reader(self.unet).value(timesteps) if needs_noise_level(self.unet) else None
        with contextlib.ExitStack() as stack:
            for encoder in self.text_encoders:
                if needs_noise_level(encoder):
                    stack.enter_context(noise_level(encoder, value))
            token_ids = [getattr(self, f"token_ids_{i}")[which] for i in range(self.num_token_ids)]
            return encode_tokens(list(self.text_encoders), token_ids, self.sdxl)

    def time_ids(self, original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning ``[N, 6]``: original (h, w), crop (top, left), target (h, w)."""
        target = torch.full_like(original_sizes, self.resolution)
        return torch.cat([original_sizes, crop_top_lefts, target], dim=1).float()

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The DreamBooth loss of a batch from `collate_dreambooth` (a scalar)."""
        mean, std = batch["latent_mean"], batch["latent_std"]
        device = mean.device
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        latents = (sample - self.latent_shift) * self.latent_scale
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator, device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        is_class = batch["is_class"]
        embeds, pooled = self.encode_prompts(is_class, timesteps)
        added = None
        if self.sdxl:
            added = {"text_embeds": pooled, "time_ids": self.time_ids(batch["original_sizes"], batch["crop_top_lefts"])}
        pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"DreamBooth supports epsilon and v_prediction schedulers, not {prediction_type!r}.")
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # [N]
        instance = ~is_class
        weights = torch.ones_like(per_example)
        if self.snr_gamma is not None:  # Min-SNR (Hang et al. 2023), as diffusers' scripts apply it
            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=self.snr_gamma) / snr
            if prediction_type == "v_prediction":
                weights = weights + 1
        loss = (per_example[instance] * weights[instance]).mean()
        if bool(is_class.any()):
            loss = loss + self.prior_loss_weight * per_example[is_class].mean()
        return loss


# -- adapters -----------------------------------------------------------------------------------------------
def attach_adapters(
    config: DreamBoothConfig,
    unet: nn.Module,
    text_encoders: list[nn.Module],
    scheduler: Any,
    *,
    target_modules: Optional[list[str]] = None,
) -> None:
    """Attach ``config.adapter`` to the denoiser (UNet or SD3 / Flux transformer) and to ``text_encoders`` (the
    ones to train); freeze the rest. ``target_modules``: the denoiser's (default ``config.target_modules``)."""
    branch = {"r": config.r, "lora_dropout": config.lora_dropout, "scaling": config.scaling}
    targets = list(config.target_modules if target_modules is None else target_modules)
    if config.adapter == "lora":  # diffusers' DreamBooth-LoRA scripts initialise A with a Gaussian
        unet.requires_grad_(False).add_adapter(
            adapter_config("lora", target_modules=targets, init_lora_weights="gaussian", **branch)
        )
        for encoder in text_encoders:
            lora = adapter_config(
                "lora", target_modules=config.text_encoder_target_modules, init_lora_weights="gaussian", **branch
            )
            encoder.requires_grad_(False).add_adapter(lora)
        return
    nara = adapter_config(config.adapter, target_modules=targets, core_scale=config.core_scale, **branch)
    inject_nara(unet, nara, scheduler=scheduler)
    for encoder in text_encoders:
        inject_nara(
            encoder, dataclasses.replace(nara, target_modules=config.text_encoder_target_modules), scheduler=scheduler
        )


def card_facts(config: DreamBoothConfig, steps: Optional[int] = None) -> dict[str, Any]:
    """What the model card says about training: the data (image count and prompts, never a local path) and steps."""
    data = f'{len(list_images(config.instance_data_dir, "instance"))} instance images, "{config.instance_prompt}"'
    if config.with_prior_preservation:
        data += f'; prior preservation with {config.num_class_images} images of "{config.class_prompt}"'
    facts: dict[str, Any] = {"data": data, "method": f"DreamBooth ({config.adapter}, rank {config.r})"}
    facts["steps"] = steps if steps is not None else config.max_steps
    facts["resolution"] = config.resolution
    return facts


def write_lora_card(folder: Path, base_model: Optional[str], facts: dict[str, Any]) -> Path:
    """``README.md`` of a diffusers LoRA folder (``--adapter lora``): Hub front matter, loading snippet, facts."""
    meta: dict[str, Any] = {"library_name": "diffusers"}
    if base_model is not None:
        meta["base_model"] = base_model
    meta["tags"] = ["lora", "dreambooth", "diffusers", "text-to-image", "nara-diffusion"]
    usage = (
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{base_model or "<the base pipeline>"}")\n'
        'pipe.load_lora_weights("<repo or folder>")'
    )
    lines = [f"# LoRA DreamBooth weights for {base_model or 'a local base pipeline'}", "", "## Usage", "", "```python"]
    lines += [usage, "```", "", "## Training", "", *(f"- {key}: {value}" for key, value in facts.items())]
    front = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False)
    path = folder / "README.md"
    path.write_text(f"---\n{front}---\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def save_adapter(
    model: Union[DreamBoothModel, FlowMatchingModel],
    folder: Path,
    config: DreamBoothConfig,
    pipeline_cls: type,
    steps: Optional[int] = None,
) -> None:
    """Write the trained adapter: NaRA's folder (`save_nara_weights`) or diffusers' LoRA folder, plus the config and
    a model card naming the base pipeline by its Hub id only (``steps``: updates done, for the card)."""
    encoders = list(model.text_encoders)
    named = dict(zip(("text_encoder", "text_encoder_2"), encoders, strict=False))
    facts = card_facts(config, steps)
    base_model = hub_base_model(config.model)
    if config.adapter == "lora":
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def layers(module: nn.Module) -> dict[str, torch.Tensor]:
            return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))

        # diffusers' own scripts: UNet keys in diffusers' naming, transformer keys as peft writes them
        denoiser = layers(model.denoiser) if model.component == "unet" else get_peft_model_state_dict(model.denoiser)
        pipeline_cls.save_lora_weights(
            folder,
            **{f"{model.component}_lora_layers": denoiser},
            **{f"{n}_lora_layers": layers(m) for n, m in named.items()},
        )
        write_lora_card(folder, base_model, facts)
    else:
        parts = {model.component: model.denoiser, **named}
        save_nara_weights(folder, **parts, base_model=base_model, model_card=facts)
    (folder / TRAINING_CONFIG_NAME).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


# -- validation images ---------------------------------------------------------------------------------------
class ValidationImages:
    """A `Trainer` callback: every ``every`` updates (and after the last), generate ``num_images`` pictures of
    ``prompt`` with the model being trained, save them as one PNG grid in ``<output_dir>/validation/`` and log
    them to TensorBoard. The seed is fixed, so successive grids differ only by training."""

    def __init__(self, pipe: Any, prompt: str, config: DreamBoothConfig) -> None:
        self.pipe, self.prompt, self.config = pipe, prompt, config
        self.grids: list[Path] = []

    def __call__(self, trainer: Trainer) -> None:
        step, cfg = trainer.global_step, self.config
        if not ((cfg.validation_steps and step % cfg.validation_steps == 0) or step == trainer.total_updates):
            return
        acc = trainer.accelerator
        if acc.is_main_process:
            trainer.model.eval()
            try:
                images = self.generate(acc)
            finally:
                trainer.model.train()
            grid = Path(cfg.output_dir) / VALIDATION_DIR / f"step-{step:06d}.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            make_image_grid(images, rows=1, cols=len(images)).save(grid)
            self.grids.append(grid)
            for tracker in acc.trackers:
                if tracker.name == "tensorboard":
                    pixels = np.stack([np.asarray(image) for image in images])
                    tracker.log_images({"validation": pixels}, step=step, dataformats="NHWC")
        acc.wait_for_everyone()

    def generate(self, accelerator: Any) -> list[Any]:
        """The pictures, made by the pipeline whose modules are being trained (NaRA text encoders re-encode the
        prompt at every step, as `load_nara_weights` arranges at inference)."""
        per_step = any(needs_noise_level(te) for te in text_encoders_of(self.pipe))
        if per_step:
            enable_per_step_prompt_encoding(self.pipe)
        try:
            with accelerator.autocast(), torch.no_grad():
                return self.pipe(
                    self.prompt,
                    num_images_per_prompt=self.config.num_validation_images,
                    height=self.config.resolution,
                    width=self.config.resolution,
                    num_inference_steps=self.config.num_inference_steps,
                    guidance_scale=self.config.guidance_scale,
                    generator=torch.Generator(accelerator.device).manual_seed(self.config.seed),
                ).images
        finally:
            if per_step:
                disable_per_step_prompt_encoding(self.pipe)


# -- the run ------------------------------------------------------------------------------------------------
def _optimizer(config: DreamBoothConfig, unet: nn.Module, text_encoders: list[nn.Module]) -> torch.optim.Optimizer:
    groups = [
        {
            "params": [p for p in unet.parameters() if p.requires_grad],
            "lr": config.learning_rate,
            "weight_decay": config.weight_decay,
        }
    ]
    encoder_params = [p for te in text_encoders for p in te.parameters() if p.requires_grad]
    if encoder_params:
        groups.append(
            {"params": encoder_params, "lr": config.text_encoder_lr, "weight_decay": config.text_encoder_weight_decay}
        )
    optimizer_cls: Any = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as err:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA machines).") from err
        optimizer_cls = bitsandbytes.optim.AdamW8bit
    return optimizer_cls(groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)


def run_dreambooth(config: DreamBoothConfig, pipe: Optional[DiffusionPipeline] = None) -> TrainResult:
    """Prepare the data, attach the adapter, train, and write ``<output_dir>/final`` (see the module docstring).

    Args:
        config: The run.
        pipe: The base pipeline (default: loaded from ``config.model``). Its UNet (and text encoders) are adapted
            in place, so after the run ``pipe`` generates with the trained adapter.

    Returns:
        Where the adapter was written (``result.final_dir``) and how many updates ran.
    """
    config.validate()  # fail fast, before loading models, also for a config changed after construction
    list_images(config.instance_data_dir, "instance")
    if pipe is None:
        check_model_path(config.model, example=EXAMPLE_PIPELINE)
        if config.vae is not None:
            check_model_path(config.vae, "vae", example="madebyollin/sdxl-vae-fp16-fix")
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    # Frozen weights in the mixed-precision dtype; SDXL's own VAE overflows in float16, a fixed one (--vae) does not.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae_dtype = torch.float32 if config.vae is None else weight_dtype
    if pipe is None:
        pipe = load_base_pipeline(config.model, config.vae, config.variant, weight_dtype, vae_dtype)
    pipe.set_progress_bar_config(disable=True)
    device = accelerator.device
    recipe = recipe_for(pipe)
    if config.train_text_encoder and getattr(recipe, "family", None) is not None and recipe.family.name == "flux":
        raise ValueError(
            "--train_text_encoder is supported for SDXL / SD and SD3 pipelines; Flux trains the transformer with "
            "cached prompt embeddings here. Drop the flag."
        )
    unet, vae, text_encoders = getattr(pipe, recipe.component), pipe.vae, text_encoders_of(pipe)
    t5 = [te for te in (getattr(pipe, "text_encoder_3", None),) if te is not None]  # SD3's T5: frozen, on device
    for module, dtype in (
        (unet, weight_dtype),
        *((te, weight_dtype) for te in (*text_encoders, *t5)),
        (vae, vae_dtype),
    ):
        module.requires_grad_(False).to(device)
        if dtype != module.dtype:
            module.to(dtype=dtype)

    if config.with_prior_preservation:
        generate_class_images(
            pipe,
            Path(config.class_data_dir),
            config.class_prompt,
            config.num_class_images,
            resolution=config.resolution,
            batch_size=config.sample_batch_size,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            seed=config.seed,
            accelerator=accelerator,
        )
        accelerator.wait_for_everyone()
    dataset = DreamBoothDataset(
        config.instance_data_dir,
        config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        class_dir=config.class_data_dir if config.with_prior_preservation else None,
        num_class_images=config.num_class_images,
        seed=config.seed,
    )

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(pixels.to(device, dtype=vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    dataset.encode_latents(encode)

    trained_encoders = text_encoders if config.train_text_encoder else []
    set_seed(config.seed)  # the adapter and the search start from the seed, whatever ran before (class images)
    attach_adapters(config, unet, trained_encoders, pipe.scheduler, target_modules=recipe.targets(config))
    for module in (unet, *trained_encoders):  # adapters train in float32 under mixed precision
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    model = recipe.model(config, trained_encoders, vae)
    if config.select == "diffora":
        _select_unet_modules(model, dataset, config, device)
    callbacks = [ValidationImages(pipe, config.validation_prompt, config)] if config.validation_prompt else []
    base_cls = type(pipe)

    def save(trained: nn.Module, folder: Path) -> None:
        save_adapter(trained, folder, config, base_cls, steps=trainer.global_step)

    trainer = Trainer(
        model,
        config,
        dataset,
        None,
        collate_dreambooth,
        lambda m, batch, generator: m(batch, generator),
        save_fn=save,
        accelerator=accelerator,
        optimizer=_optimizer(config, unet, trained_encoders),
        callbacks=callbacks,
    )
    result = trainer.train()
    if config.push_to_hub and accelerator.is_main_process:
        repo = push_folder_to_hub(result.final_dir, config.hub_model_id, base_model=config.model)
        logger.info("Uploaded %s to https://huggingface.co/%s", result.final_dir, repo)
    accelerator.wait_for_everyone()
    return result


def _select_unet_modules(model: DreamBoothModel, dataset: Any, config: DreamBoothConfig, device: Any) -> None:
    """DiffoRA over the UNet's adapted modules, on a seeded held-out share of the instance images."""

    def loss(m: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return m({k: v.to(device) for k, v in batch.items()}, generator)

    model.to(device)
    select_before_training(model, dataset, collate_dreambooth, loss, config, adapted=model.denoiser)


def load_trained_pipeline(
    adapter_dir: Union[str, Path], model: Optional[str] = None, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """A stock diffusers pipeline with a DreamBooth adapter loaded (NaRA through `load_nara_weights`, LoRA through
    diffusers' ``load_lora_weights``).

    Args:
        adapter_dir: A ``final/`` folder of `run_dreambooth`.
        model: The base pipeline (default: the one recorded in the folder's ``training_config.json``).
        dtype: Dtype of the base pipeline.
    """
    adapter_dir = Path(adapter_dir)
    recorded = adapter_dir / TRAINING_CONFIG_NAME
    trained = json.loads(recorded.read_text()) if recorded.is_file() else {}
    model = model or trained.get("model")
    if model is None:
        raise ValueError(f"No base model given and no {TRAINING_CONFIG_NAME} in {adapter_dir}; pass model=.")
    model = check_model_path(model, example=EXAMPLE_PIPELINE)
    pipe = DiffusionPipeline.from_pretrained(model, **dtype_kwargs(dtype))
    vae = trained.get("vae")
    if vae not in (None, "none") and model == trained.get("model"):
        pipe.vae = AutoencoderKL.from_pretrained(vae, **dtype_kwargs(dtype))
    if (adapter_dir / PIPELINE_WEIGHTS_NAME).is_file():
        enable_nara_loading(pipe).load_nara_weights(adapter_dir)
    elif (adapter_dir / LORA_WEIGHT_NAME).is_file():
        pipe.load_lora_weights(adapter_dir)
    else:
        raise FileNotFoundError(
            f"{adapter_dir} holds neither {PIPELINE_WEIGHTS_NAME} (NaRA) nor {LORA_WEIGHT_NAME} (LoRA)."
        )
    return pipe
