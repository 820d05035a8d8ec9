"""A small SDXL-architecture pipeline, pretrained from scratch on the toy scenes of `nara_diffusion.toy.image`.

Only diffusers' and transformers' own classes: a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``
(SDXL's micro-conditioning and pooled text embedding), an ``AutoencoderKL``, ``CLIPTextModel`` +
``CLIPTextModelWithProjection`` with two ``CLIPTokenizer``s written offline (`clip_tokenizer`), and SDXL's
``EulerDiscreteScheduler``. Sizes are cut down so that a 2-core CPU trains it in minutes: 32 × 32 images, a VAE that
downsamples 2× (SDXL: 8×) to 16 × 16 × 4 latents, a 3-level UNet of about 1.7 M parameters.

Training (`pretrain_toy_pipeline`): first the VAE alone (reconstruction MSE plus a small KL term) on generic
`codec_image` pictures and toy scenes (a third of them striped, so red-and-white bands like the DreamBooth
subject's are part of what the codec keeps: `vae_subject_fidelity` logs it); its ``scaling_factor`` is then set to
1 / std of the scene latents; then the UNet and both text encoders together with SDXL's ε-prediction objective on
fresh toy scenes and their captions (10% empty captions, for classifier-free guidance), with random
micro-conditioning sizes so that any photo size is familiar.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..image.dreambooth import encode_tokens, tokenize
from .image import (
    PALETTE,
    SHAPES,
    STRIPED_SHARE,
    TOY_RESOLUTION,
    TOY_WORDS,
    as_array,
    classify_scene,
    codec_image,
    draw_scene,
    draw_subject,
    random_scene,
    subject_similarity,
)

logger = logging.getLogger(__name__)


def clip_tokenizer(words: Sequence[str], max_length: int, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer built offline: every byte (alone and word-final), plus merges that make each
    of ``words`` one token. SDXL's second tokenizer pads with ``"!"``."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)


def clip_text_encoders(
    vocab_size: int, max_length: int, intermediate_size: int
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's two text encoders at toy size (width 32, 2 layers, 4 heads; the second with a 32-d projection, which
    gives the pooled embedding), randomly initialised from the current torch seed, in this order."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    return CLIPTextModel(config), CLIPTextModelWithProjection(config)


def assemble_sdxl(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    tokenizer_2: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline from its parts, with SDXL's Euler scheduler settings and no watermarker."""
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_toy_pipeline(seed: int = 0, max_length: int = 16) -> StableDiffusionXLPipeline:
    """The untrained toy pipeline (random weights, float32), deterministic in ``seed``."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(TOY_WORDS, max_length)
    tokenizer_2 = clip_tokenizer(TOY_WORDS, max_length, pad_token="!")
    text_encoder, text_encoder_2 = clip_text_encoders(len(tokenizer), max_length, intermediate_size=64)
    latent_size = TOY_RESOLUTION // 2
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        transformer_layers_per_block=1,
        use_linear_projection=True,
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six micro-conditioning numbers + pooled embedding
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),  # two levels: 2× downsampling (SDXL: four levels, 8×)
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TOY_RESOLUTION,
    )
    pipe = assemble_sdxl(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet)
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


@dataclass
class PretrainConfig:
    """Steps, batch sizes and learning rates of `pretrain_toy_pipeline` (the committed toy used these defaults)."""

    seed: int = 0
    vae_steps: int = 1500
    vae_lr: float = 1e-3
    unet_steps: int = 4500
    unet_lr: float = 1e-3
    text_encoder_lr: float = 3e-4
    batch_size: int = 32
    warmup: int = 100
    empty_caption: float = 0.1  # share of empty captions (classifier-free guidance)
    kl_weight: float = 1e-4
    log_every: int = 100
    # second stage (`learn_stripes`): the world with striped shapes, continuing from the first stage's weights
    stripes_vae_steps: int = 600
    stripes_unet_steps: int = 1200
    stripes_lr: float = 3e-4  # VAE and UNet (text encoders: text_encoder_lr / 3)


def _pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] from uint8 ``[H, W, 3]`` arrays."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_vae(
    vae: AutoencoderKL,
    config: PretrainConfig,
    log: Callable[[str], None] = logger.info,
    *,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    seed: Optional[int] = None,
    striped: float = 0.0,
) -> float:
    """Train ``vae`` to reconstruct codec pictures and toy scenes (half each per batch; a share ``striped`` of the
    scenes striped) for ``steps`` (default ``config.vae_steps``) at ``lr`` (``config.vae_lr``) with data from
    ``seed`` (``config.seed``); returns the final MSE."""
    steps, lr = steps or config.vae_steps, lr or config.vae_lr
    rng = np.random.default_rng(config.seed if seed is None else seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, config.warmup))
    vae.train().requires_grad_(True)
    half = config.batch_size // 2
    mse = float("nan")
    for step in range(steps):
        images = [codec_image(rng) for _ in range(half)]
        images += [np.asarray(draw_scene(random_scene(rng, striped=striped))) for _ in range(config.batch_size - half)]
        x = _pixels(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss_rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = loss_rec + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        mse = float(loss_rec)
        if step % config.log_every == 0 or step == steps - 1:
            log(f"vae step {step}: mse {mse:.5f} kl {float(kl):.3f}")
    vae.eval().requires_grad_(False)
    return mse


@torch.no_grad()
def vae_subject_fidelity(vae: AutoencoderKL, n: int = 8, seed: int = 0) -> tuple[float, float]:
    """`subject_similarity` of ``n`` 32-px red-and-white striped balls (random backgrounds, sizes, positions, bands
    5-6 px, like the instance photos' centre crops) to themselves, and of their VAE reconstructions (posterior mean)
    to the originals: what the codec lets any fine-tune reach."""
    rng = np.random.default_rng(seed)
    names = list(PALETTE)
    originals = []
    for _ in range(n):
        radius = int(rng.integers(7, 11))
        centre = (int(rng.integers(radius, 32 - radius)), int(rng.integers(radius, 32 - radius)))
        background = PALETTE[names[int(rng.integers(len(names)))]]
        originals.append(np.asarray(draw_subject((32, 32), background, centre, radius, band=int(rng.integers(5, 7)))))
    return subject_similarity(originals, originals), subject_similarity(vae_reconstructions(vae, originals), originals)


@torch.no_grad()
def vae_reconstructions(vae: AutoencoderKL, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``images`` (uint8 ``[H, W, 3]``) encoded (posterior mean) and decoded by ``vae``, as uint8 arrays."""
    return [as_array(r) for r in vae.decode(vae.encode(_pixels(images)).latent_dist.mean).sample]


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, seed: int, n: int = 512) -> float:
    """Set ``vae.config.scaling_factor`` to 1 / std of the posterior means of ``n`` toy scenes (as SD's 0.18215
    was chosen); returns it."""
    rng = np.random.default_rng(seed + 1)
    x = _pixels([np.asarray(draw_scene(random_scene(rng, striped=0.0))) for _ in range(n)])
    scale = 1.0 / float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def random_caption(scene_rng: np.random.Generator, scene, empty: float) -> str:
    """A caption of ``scene``: empty with probability ``empty``, else the full template (60%), with "a photo of"
    (20%), the shape only (10%) or the background only (10%)."""
    if scene_rng.random() < empty:
        return ""
    template = int(scene_rng.choice(4, p=[0.6, 0.2, 0.1, 0.1]))
    return scene.caption(template)


def pretrain_denoiser(
    pipe: StableDiffusionXLPipeline,
    config: PretrainConfig,
    log: Callable[[str], None] = logger.info,
    *,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    text_encoder_lr: Optional[float] = None,
    seed: Optional[int] = None,
    striped: float = 0.0,
) -> float:
    """Train the UNet and both text encoders on toy scenes (a share ``striped`` of them striped) with
    ε-prediction (the VAE is frozen) for ``steps`` (default ``config.unet_steps``) at ``lr`` / ``text_encoder_lr``
    (``config``'s) with data from ``seed`` (``config.seed``); returns the mean loss of the last ``log_every``
    steps."""
    steps = steps or config.unet_steps
    seed = config.seed if seed is None else seed
    unet, vae = pipe.unet, pipe.vae
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    params = [
        {"params": list(unet.parameters()), "lr": lr or config.unet_lr},
        {"params": [p for e in encoders for p in e.parameters()], "lr": text_encoder_lr or config.text_encoder_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, config.warmup))
    for module in (unet, *encoders):
        module.train().requires_grad_(True)
    vae.requires_grad_(False)
    scale = float(vae.config.scaling_factor)
    recent: list[float] = []
    for step in range(steps):
        scenes = [random_scene(rng, striped=striped) for _ in range(config.batch_size)]
        captions = [random_caption(rng, s, config.empty_caption) for s in scenes]
        with torch.no_grad():
            dist = vae.encode(_pixels([np.asarray(draw_scene(s)) for s in scenes])).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(scenes),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        embeds, pooled = encode_tokens(encoders, [tokenize(tok, captions) for tok in tokenizers], sdxl=True)
        # micro-conditioning: original size (h, w) of a "photo" of 32-96 px, crop corner 0-16, target 32 × 32
        sizes = torch.randint(TOY_RESOLUTION, 3 * TOY_RESOLUTION + 1, (len(scenes), 2), generator=gen)
        crops = torch.randint(0, TOY_RESOLUTION // 2 + 1, (len(scenes), 2), generator=gen)
        time_ids = torch.cat([sizes, crops, torch.full_like(sizes, TOY_RESOLUTION)], dim=1).float()
        added = {"text_embeds": pooled, "time_ids": time_ids}
        pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        recent = [*recent[-(config.log_every - 1) :], float(loss)]
        if step % config.log_every == 0 or step == steps - 1:
            log(f"unet step {step}: loss {np.mean(recent):.4f}")
    for module in (unet, *encoders):
        module.eval().requires_grad_(False)
    return float(np.mean(recent))


def generate(
    pipe: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    resolution: int = TOY_RESOLUTION,
) -> list:
    """One PIL image per (prompt, seed) pair (prompt-major), each from its own seeded generator."""
    images = []
    with torch.no_grad():
        for prompt in prompts:
            images += pipe(
                [prompt] * len(seeds),
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
            ).images
    return images


def scene_prompts() -> list[str]:
    """Twelve fixed evaluation prompts: each shape in two colour combinations, each palette colour named twice
    as shape colour and twice as background."""
    names = list(PALETTE)
    prompts = []
    for i in range(12):
        colour, background = names[i % 6], names[(i + 1 + i // 6) % 6]
        prompts.append(f"a {colour} {SHAPES[i % 3]} on a {background} background")
    return prompts


def scene_accuracy(pipe: StableDiffusionXLPipeline, prompts: Sequence[str], seeds: Sequence[int], **kw) -> dict:
    """Generate each prompt with each seed and read it back (`classify_scene`): accuracy of background colour,
    shape colour and shape, in [0, 1]."""
    from .image import named_colours

    images = generate(pipe, prompts, seeds, **kw)
    hits = np.zeros(3)
    for k, image in enumerate(images):
        colour, background, shape = named_colours(prompts[k // len(seeds)])
        reading = classify_scene(image)
        hits += [reading.background == background, reading.colour == colour, reading.shape == shape]
    acc = hits / len(images)
    return {"background": float(acc[0]), "colour": float(acc[1]), "shape": float(acc[2])}


def learn_stripes(
    pipe: StableDiffusionXLPipeline, config: PretrainConfig, log: Callable[[str], None] = logger.info
) -> StableDiffusionXLPipeline:
    """The second pretraining stage: continue training the VAE, then the UNet and text encoders, on the toy world
    with striped shapes (`STRIPED_SHARE`), so that the codec keeps red-and-white bands and the denoiser can draw
    "a striped red circle"; the latent scale stays the first stage's. Its data and torch's global generator are seeded
    with ``config.seed + 10``, so it gives the same weights in memory after the first stage or from saved ones."""
    start = time.perf_counter()
    seed = config.seed + 10
    torch.manual_seed(seed)  # the VAE samples its posterior with torch's global generator
    kw = {"lr": config.stripes_lr, "seed": seed, "striped": STRIPED_SHARE}
    pretrain_vae(pipe.vae, config, log, steps=config.stripes_vae_steps, **kw)
    own, recon = vae_subject_fidelity(pipe.vae)
    log(f"subject similarity of striped balls: {own:.3f}, of their VAE reconstructions: {recon:.3f}")
    pretrain_denoiser(pipe, config, log, steps=config.stripes_unet_steps, text_encoder_lr=config.text_encoder_lr / 3,
                      **kw)  # fmt: skip
    log(f"stripes stage done in {time.perf_counter() - start:.0f} s")
    return pipe


def pretrain_toy_pipeline(
    config: Optional[PretrainConfig] = None, log: Callable[[str], None] = logger.info
) -> StableDiffusionXLPipeline:
    """Build the toy pipeline and train it: the plain world (VAE, latent scale, UNet + text encoders), then
    `learn_stripes`; deterministic in ``config.seed`` on one thread."""
    config = config or PretrainConfig()
    pipe = build_toy_pipeline(config.seed)
    start = time.perf_counter()
    pretrain_vae(pipe.vae, config, log)
    log(f"latent scaling factor {set_latent_scale(pipe.vae, config.seed):.4f} ({time.perf_counter() - start:.0f} s)")
    pretrain_denoiser(pipe, config, log)
    log(f"plain world done in {time.perf_counter() - start:.0f} s")
    learn_stripes(pipe, config, log)
    log(f"pretraining done in {time.perf_counter() - start:.0f} s")
    return pipe


__all__ = [
    "PretrainConfig",
    "build_toy_pipeline",
    "clip_tokenizer",
    "generate",
    "learn_stripes",
    "pretrain_denoiser",
    "pretrain_toy_pipeline",
    "pretrain_vae",
    "scene_accuracy",
    "scene_prompts",
    "set_latent_scale",
    "vae_reconstructions",
    "vae_subject_fidelity",
]
