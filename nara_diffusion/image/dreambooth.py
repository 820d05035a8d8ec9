"""DreamBooth fine-tuning of an SDXL (or SD 1.5 / 2.x) UNet with NaRA, NaRA-C or peft's LoRA: the whole run.

``examples/sdxl_dreambooth/train.py`` is a thin wrapper over `run_dreambooth`; the same function serves scripts of
your own::

    from nara_diffusion.image.dreambooth import DreamBoothConfig, run_dreambooth
    run_dreambooth(DreamBoothConfig(instance_data_dir="dog/", instance_prompt="a photo of sks dog"))

One training step (`DreamBoothModel.forward`): draw latents from the cached VAE posterior of each image, a
timestep t ~ U{0, …, T−1} and Gaussian noise per example, noise the latents with the training scheduler, predict
with the UNet (SDXL: with the pooled text embedding and the micro-conditioning time ids), and regress the
scheduler's target (ε or v) with MSE, optionally Min-SNR weighted; with prior preservation the class half of the
batch adds ``prior_loss_weight`` × its own MSE. NaRA reads λ = t/T of each example from the UNet's ``timestep``;
NaRA text encoders get the same λ.

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
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from diffusers.utils import make_image_grid
from torch import nn

from ..core import NaRAConfig, noise_level
from ..selection.diffora import SelectionConfig, select_before_training
from ..training import TrainConfig, Trainer, TrainResult, build_accelerator
from ..training.config import check_float, check_int, check_model_path, config_to_dict
from .data import DreamBoothDataset, check_resolution, collate_dreambooth, list_images
from .loaders import WEIGHT_NAME, enable_nara_loading, save_nara_weights
from .prompts import disable_per_step_prompt_encoding, enable_per_step_prompt_encoding
from .unet import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, add_nara, needs_noise_level, unet_reader

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
    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    vae: Optional[str] = None  # e.g. madebyollin/sdxl-vae-fp16-fix (then the VAE may run in half precision)
    variant: Optional[str] = None  # e.g. "fp16" weights files
    # data
    instance_data_dir: str = ""
    instance_prompt: str = ""
    class_data_dir: Optional[str] = None  # default with prior preservation: <output_dir>/class_images
    class_prompt: Optional[str] = None
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_batch_size: int = 4
    resolution: int = 1024
    center_crop: bool = False
    random_flip: bool = False
    # adapter
    adapter: str = "nara"
    r: int = 4
    target_modules: list[str] = field(default_factory=lambda: list(UNET_TARGET_MODULES))
    core_scale: float = 0.1
    lora_dropout: float = 0.0
    scaling: float = 1.0
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGET_MODULES))
    text_encoder_lr: float = 5e-6
    text_encoder_weight_decay: float = 1e-3
    # objective and optimiser
    snr_gamma: Optional[float] = None  # Min-SNR weighting (5.0 is the usual value); None: plain MSE
    use_8bit_adam: bool = False
    # validation and sampling
    validation_prompt: Optional[str] = None
    num_validation_images: int = 4
    validation_steps: int = 50  # updates between validation grids (≈ diffusers' 25 epochs of 5 images); 0: off
    num_inference_steps: int = 25  # for validation images and generated class images
    guidance_scale: float = 5.0
    # TrainConfig fields with the DreamBooth recipe's defaults
    output_dir: str = "outputs/dreambooth"
    seed: int = 0
    learning_rate: float = 1e-4
    max_steps: Optional[int] = 500
    batch_size: int = 1
    grad_accum: int = 4
    weight_decay: float = 1e-4
    adam_beta2: float = 0.999
    warmup_ratio: float = 0.0
    lr_schedule: str = "constant"
    eval_every: int = 500  # checkpoint period (diffusers' checkpointing_steps)

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
    """Load a UNet text-to-image pipeline (SDXL, SD 1.5 / 2.x), optionally with another VAE.

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
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{model} is a {type(pipe).__name__}; DreamBooth here needs a UNet2DConditionModel pipeline.")
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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Activation checkpointing in the UNet and the trained text encoders (called by the `Trainer`)."""
        self.unet.enable_gradient_checkpointing()
        for encoder in self.text_encoders:
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

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
def attach_adapters(config: DreamBoothConfig, unet: nn.Module, text_encoders: list[nn.Module], scheduler: Any) -> None:
    """Attach ``config.adapter`` to the UNet (and to ``text_encoders``, the ones to train); freeze the rest."""
    if config.adapter == "lora":
        from peft import LoraConfig

        def lora(targets: list[str]) -> LoraConfig:
            return LoraConfig(
                r=config.r,
                lora_alpha=config.scaling * config.r,
                lora_dropout=config.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=targets,
            )

        unet.requires_grad_(False).add_adapter(lora(config.target_modules))
        for encoder in text_encoders:
            encoder.requires_grad_(False).add_adapter(lora(config.text_encoder_target_modules))
        return
    nara = NaRAConfig(
        r=config.r,
        target_modules=config.target_modules,
        core_scale=config.core_scale,
        lora_dropout=config.lora_dropout,
        scaling=config.scaling,
        core="constant" if config.adapter == "nara-c" else "noise",
    )
    add_nara(unet, nara, scheduler=scheduler)
    for encoder in text_encoders:
        add_nara(
            encoder, dataclasses.replace(nara, target_modules=config.text_encoder_target_modules), scheduler=scheduler
        )


def save_adapter(model: DreamBoothModel, folder: Path, config: DreamBoothConfig, pipeline_cls: type) -> None:
    """Write the trained adapter: NaRA's folder (`save_nara_weights`) or diffusers' LoRA folder, plus the config."""
    encoders = list(model.text_encoders)
    named = dict(zip(("text_encoder", "text_encoder_2"), encoders, strict=False))
    if config.adapter == "lora":
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def layers(module: nn.Module) -> dict[str, torch.Tensor]:
            return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))

        pipeline_cls.save_lora_weights(
            folder, unet_lora_layers=layers(model.unet), **{f"{n}_lora_layers": layers(m) for n, m in named.items()}
        )
    else:
        save_nara_weights(folder, unet=model.unet, **named)
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
    unet, vae, text_encoders = pipe.unet, pipe.vae, text_encoders_of(pipe)
    for module, dtype in ((unet, weight_dtype), *((te, weight_dtype) for te in text_encoders), (vae, vae_dtype)):
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
    latent_shift = latent_scale = None
    scaling = torch.tensor(float(vae.config.scaling_factor))
    if getattr(vae.config, "latents_mean", None) is not None:  # e.g. Playground v2.5
        latent_shift = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        latent_scale = scaling / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    else:
        latent_scale = scaling

    trained_encoders = text_encoders if config.train_text_encoder else []
    set_seed(config.seed)  # the adapter and the search start from the seed, whatever ran before (class images)
    attach_adapters(config, unet, trained_encoders, pipe.scheduler)
    for module in (unet, *trained_encoders):  # adapters train in float32 under mixed precision
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    sdxl = is_sdxl(unet)
    prompts = [config.instance_prompt, config.class_prompt or config.instance_prompt]
    token_ids = [tokenize(tok, prompts) for tok in tokenizers_of(pipe)]
    cache: dict[str, Any] = {}
    if config.train_text_encoder:
        cache.update(text_encoders=trained_encoders, token_ids=token_ids)
    else:
        with torch.no_grad():
            embeds, pooled = encode_tokens(text_encoders, token_ids, sdxl)
        cache.update(prompt_embeds=embeds.float(), pooled_embeds=None if pooled is None else pooled.float())
    model = DreamBoothModel(
        unet,
        DDPMScheduler.from_config(pipe.scheduler.config),
        resolution=config.resolution,
        prior_loss_weight=config.prior_loss_weight,
        snr_gamma=config.snr_gamma,
        latent_shift=latent_shift,
        latent_scale=latent_scale,
        **cache,
    )
    if config.select == "diffora":
        _select_unet_modules(model, dataset, config, device)
    callbacks = [ValidationImages(pipe, config.validation_prompt, config)] if config.validation_prompt else []
    base_cls = type(pipe)

    def save(trained: nn.Module, folder: Path) -> None:
        save_adapter(trained, folder, config, base_cls)

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
    return trainer.train()


def _select_unet_modules(model: DreamBoothModel, dataset: Any, config: DreamBoothConfig, device: Any) -> None:
    """DiffoRA over the UNet's adapted modules, on a seeded held-out share of the instance images."""

    def loss(m: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return m({k: v.to(device) for k, v in batch.items()}, generator)

    model.to(device)
    select_before_training(model, dataset, collate_dreambooth, loss, config, adapted=model.unet)


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
    if (adapter_dir / WEIGHT_NAME).is_file():
        enable_nara_loading(pipe).load_nara_weights(adapter_dir)
    elif (adapter_dir / LORA_WEIGHT_NAME).is_file():
        pipe.load_lora_weights(adapter_dir)
    else:
        raise FileNotFoundError(f"{adapter_dir} holds neither {WEIGHT_NAME} (NaRA) nor {LORA_WEIGHT_NAME} (LoRA).")
    return pipe
