"""The flow-matching DreamBooth objective of SD3 and Flux, as diffusers' ``train_dreambooth_lora_sd3.py`` /
``train_dreambooth_lora_flux.py`` define it.

One step (`FlowMatchingModel.forward`): latents ``x₀ = (z − shift) · scale`` from the cached VAE posterior, noise
``ε``, a noise level per example drawn by the timestep density (``u`` from `compute_density_for_timestep_sampling`:
``logit_normal``, ``mode`` or uniform), mapped through the training scheduler's (shifted) schedule: index
``⌊u·T⌋``, ``σ = scheduler.sigmas[index]``, ``t = scheduler.timesteps[index] = σ·T``. The noisy input is
``x_σ = (1 − σ)·x₀ + σ·ε``; the transformer predicts the velocity ``ε − x₀`` (SD3 with ``precondition_outputs``:
the prediction is turned into ``x̂₀ = x_σ − σ·v̂`` and regressed on ``x₀``), with the loss weighting of
`compute_loss_weighting_for_sd3` (``sigma_sqrt``, ``cosmap``, else 1). Flux packs the latents into 2×2 patches,
passes ``timestep = t / 1000 = σ`` and the guidance embedding. With prior preservation the class examples add
``prior_loss_weight`` × their own loss.

NaRA reads λ = σ of each example from the transformer's ``timestep`` (`nara_diffusion.image.denoisers`). When SD3's
two CLIP text encoders train (``--train_text_encoder``), each example's prompt is encoded as the pipeline encodes it
(penultimate hidden states of both, concatenated, zero-padded to T5's width, followed by the cached T5 embeddings;
the pooled projections concatenated), with NaRA text encoders at the example's own λ.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch import nn

from ..core import noise_level
from .unet import checkpoint_text_encoders, needs_noise_level, unet_reader

#: ``--weighting_scheme`` choices (diffusers' names): the first three change how σ is drawn, the next two weight
#: the loss, ``none`` is uniform and unweighted.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")


def sample_noise_levels(
    scheduler: FlowMatchEulerDiscreteScheduler,
    batch_size: int,
    generator: torch.Generator,
    *,
    weighting_scheme: str,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: Any = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [N], sigmas [N])`` of one batch: ``u`` from the density, then the training schedule at ``⌊u·T⌋``.

    The scheduler is a fresh training copy (``FlowMatchEulerDiscreteScheduler.from_config``): its ``timesteps`` and
    ``sigmas`` are the full T-step shifted schedule, ``timesteps = sigmas · T``.
    """
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=generator.device,
        generator=generator,
    )
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(0, len(scheduler.timesteps) - 1).cpu()
    return scheduler.timesteps[indices].to(device), scheduler.sigmas[indices].to(device)


class FlowMatchingModel(nn.Module):
    """An SD3 or Flux transformer with the flow-matching DreamBooth loss as its forward (see the module docstring).

    Args:
        transformer: ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``, with its adapter attached.
        noise_scheduler: The training scheduler (``FlowMatchEulerDiscreteScheduler`` from the pipeline's config).
        family: ``"sd3"`` or ``"flux"``.
        prompt_embeds, pooled_embeds: Cached embeddings of ``[instance prompt, class prompt]`` as the pipeline's
            ``encode_prompt`` makes them: ``[2, L, D]`` and ``[2, P]`` (None when the text encoders train).
        text_encoders, token_ids, t5_embeds: SD3 with trained text encoders: its two CLIP encoders, their
            ``[2, 77]`` token ids of the two prompts, and the frozen T5's cached ``[2, L₃, D]`` embeddings.
        text_ids: Flux's text position ids ``[L, 3]``.
        latent_shift, latent_scale: Latents are ``(z − shift) · scale`` (the VAE's shift and scaling factors).
        vae_scale_factor: Pixels per latent (Flux's unpacking).
        prior_loss_weight: Weight of the class examples' loss.
        weighting_scheme, logit_mean, logit_std, mode_scale: The timestep density and loss weighting.
        precondition_outputs: SD3: regress ``x̂₀ = x_σ − σ·v̂`` on ``x₀`` (diffusers' SD3 default), else ``v̂`` on
            ``ε − x₀``; Flux always the latter.
        guidance_scale: The guidance embedded by Flux(-dev) transformers during training.
    """

    def __init__(
        self,
        transformer: nn.Module,
        noise_scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        family: str,
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_embeds: Optional[torch.Tensor] = None,
        text_ids: Optional[torch.Tensor] = None,
        text_encoders: Optional[list[nn.Module]] = None,
        token_ids: Optional[list[torch.Tensor]] = None,
        t5_embeds: Optional[torch.Tensor] = None,
        latent_shift: float = 0.0,
        latent_scale: float = 1.0,
        vae_scale_factor: int = 8,
        prior_loss_weight: float = 1.0,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        precondition_outputs: bool = True,
        guidance_scale: float = 3.5,
    ) -> None:
        super().__init__()
        if family not in ("sd3", "flux"):
            raise ValueError(f"FlowMatchingModel trains SD3 or Flux transformers, not family {family!r}.")
        if (prompt_embeds is None) == (text_encoders is None):
            raise ValueError("Give either cached prompt embeddings or the text encoders to train, not both.")
        if text_encoders is not None and (family != "sd3" or t5_embeds is None or len(token_ids or []) != 2):
            raise ValueError("Trained text encoders are supported for SD3: its two CLIP encoders, ids and T5 embeds.")
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {weighting_scheme!r}."
            )
        self.transformer, self.noise_scheduler, self.family = transformer, noise_scheduler, family
        self.component = "transformer"
        self.latent_shift, self.latent_scale, self.vae_scale_factor = latent_shift, latent_scale, vae_scale_factor
        self.prior_loss_weight = prior_loss_weight
        self.density = {"weighting_scheme": weighting_scheme, "logit_mean": logit_mean, "logit_std": logit_std}
        self.density["mode_scale"] = mode_scale
        self.precondition_outputs = precondition_outputs and family == "sd3"
        self.guidance_scale = guidance_scale
        self.register_buffer("prompt_embeds", prompt_embeds, False)
        self.register_buffer("pooled_embeds", pooled_embeds, False)
        self.register_buffer("text_ids", text_ids, False)
        self.text_encoders = nn.ModuleList(text_encoders or [])
        self.register_buffer("t5_embeds", t5_embeds, False)
        for i, ids in enumerate(token_ids or []):
            self.register_buffer(f"token_ids_{i}", ids, False)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Activation checkpointing in the transformer and the trained text encoders (called by the `Trainer`)."""
        self.transformer.enable_gradient_checkpointing()
        checkpoint_text_encoders(self.text_encoders)

    def encode_prompts(self, which: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``[N, L, D]`` and pooled ``[N, P]`` of each example's prompt (0: instance, 1: class); trained
        NaRA text encoders are conditioned on each example's own λ, like the transformer."""
        if self.prompt_embeds is not None:
            return self.prompt_embeds[which], self.pooled_embeds[which]
        value = unet_reader(self.transformer).value(timesteps) if needs_noise_level(self.transformer) else None
        hidden, pooled = [], []
        with contextlib.ExitStack() as stack:
            for i, encoder in enumerate(self.text_encoders):
                if needs_noise_level(encoder):
                    stack.enter_context(noise_level(encoder, value))
                out = encoder(getattr(self, f"token_ids_{i}")[which], output_hidden_states=True)
                pooled.append(out[0])
                hidden.append(out.hidden_states[-2])
        t5 = self.t5_embeds[which]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity prediction ``[N, C, h, w]`` for latents ``noisy`` at ``timesteps`` (σ·T)."""
        embeds, pooled = self.encode_prompts(which, timesteps)
        if self.family == "sd3":
            return self.transformer(
                hidden_states=noisy,
                timestep=timesteps,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        n, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance_scale, device=noisy.device, dtype=torch.float32)
        pred = self.transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,  # Flux takes σ; the model multiplies by 1000 itself
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=self.text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = self.vae_scale_factor
        return FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The DreamBooth flow-matching loss of a batch from `collate_dreambooth` (a scalar)."""
        mean, std = batch["latent_mean"], batch["latent_std"]
        device = mean.device
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        latents = (sample - self.latent_shift) * self.latent_scale
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        timesteps, sigmas = sample_noise_levels(
            self.noise_scheduler, latents.shape[0], generator, device=device, **self.density
        )
        sigma = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1.0 - sigma) * latents + sigma * noise
        is_class = batch["is_class"]
        pred = self.predict(noisy, timesteps, is_class.long())
        if self.precondition_outputs:
            pred, target = pred * (-sigma) + noisy, latents
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(self.density["weighting_scheme"], sigma).float()
        per_example = (weighting * (pred.float() - target.float()) ** 2).flatten(1).mean(1)  # [N]
        loss = per_example[~is_class].mean()
        if bool(is_class.any()):
            loss = loss + self.prior_loss_weight * per_example[is_class].mean()
        return loss
