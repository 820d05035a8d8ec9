"""Write a tiny random SDXL pipeline (and, optionally, the 5 toy instance images) to folders.

The pipeline has SDXL's shape at toy size: a UNet2DConditionModel with ``addition_embed_type="text_time"``
(micro-conditioning), an AutoencoderKL with SDXL's 8× downsampling, two CLIP text encoders (the second with a
projection, giving the pooled embedding) and two CLIP tokenizers built from a small vocabulary written here, and
SDXL's Euler scheduler. It knows nothing (random weights): it exists so that DreamBooth training and inference
run end to end in seconds on a CPU. Real runs use ``stabilityai/stable-diffusion-xl-base-1.0``.

    python examples/sdxl_dreambooth/make_tiny_pipeline.py outputs/tiny-sdxl
    python examples/sdxl_dreambooth/make_tiny_pipeline.py outputs/tiny-sdxl \\
        --write_images examples/sdxl_dreambooth/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image, ImageDraw
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

#: Words that get a token of their own (all other text falls back to one token per character).
WORDS = "a photo of sks dog toy ball cube in the on snow beach bucket red white striped pattern garden".split()
MAX_LENGTH = 32  # tokens per prompt (SDXL: 77)


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer: every byte (alone and word-final), plus merges that make each of `WORDS`
    one token. SDXL's second tokenizer pads with ``"!"``."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MAX_LENGTH)


def build_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline, deterministic in ``seed`` (float32, eval mode)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
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
        block_out_channels=(8, 8, 16, 16),  # four levels: 8× downsampling, as in SDXL
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


def draw_instance_images(folder: Path) -> list[Path]:
    """Five pictures of one toy (a red-and-white striped ball) on different backgrounds, at different sizes,
    positions and PIL modes (RGB, RGBA, palette), as a user's phone photos would differ."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = [  # (size, background, centre, radius, mode)
        ((64, 64), (90, 160, 90), (32, 34), 18, "RGB"),
        ((96, 72), (200, 190, 150), (60, 36), 22, "RGBA"),
        ((72, 64), (120, 160, 220), (30, 30), 16, "P"),
        ((80, 80), (235, 235, 240), (44, 46), 24, "RGB"),
        ((64, 96), (70, 70, 90), (30, 56), 20, "RGB"),
    ]
    paths = []
    for i, (size, background, (cx, cy), radius, mode) in enumerate(scenes):
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, size[1] * 3 // 4, size[0], size[1]), fill=tuple(c // 2 for c in background))  # ground
        for k in range(-radius, radius, 6):  # stripes, clipped to the disc
            for dy in range(-radius, radius + 1):
                for dx in range(k, min(k + 3, radius + 1)):
                    if dx * dx + dy * dy <= radius * radius:
                        image.putpixel((cx + dx, cy + dy), (220, 30, 40))
                for dx in range(k + 3, min(k + 6, radius + 1)):
                    if dx * dx + dy * dy <= radius * radius:
                        image.putpixel((cx + dx, cy + dy), (250, 250, 250))
        if mode == "RGBA":
            image = image.convert("RGBA")
        elif mode == "P":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        path = folder / f"toy_{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder for the pipeline (save_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write_images", type=Path, default=None, help="also write the 5 toy images here")
    args = parser.parse_args()
    build_pipeline(args.seed).save_pretrained(args.output_dir)
    print(f"tiny SDXL pipeline written to {args.output_dir}")
    if args.write_images is not None:
        print("images:", ", ".join(str(p) for p in draw_instance_images(args.write_images)))


if __name__ == "__main__":
    main()
