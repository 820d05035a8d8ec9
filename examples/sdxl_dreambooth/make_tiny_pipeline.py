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
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

from nara_diffusion.toy.image import draw_subject_images
from nara_diffusion.toy.image_pretrain import assemble_sdxl, clip_text_encoders, clip_tokenizer

#: Words that get a token of their own (all other text falls back to one token per character).
WORDS = "a photo of sks dog toy ball cube in the on snow beach bucket red white striped pattern garden".split()
MAX_LENGTH = 32  # tokens per prompt (SDXL: 77)


def build_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline, deterministic in ``seed`` (float32, eval mode)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(WORDS, MAX_LENGTH), clip_tokenizer(WORDS, MAX_LENGTH, pad_token="!")
    text_encoder, text_encoder_2 = clip_text_encoders(len(tokenizer), MAX_LENGTH, intermediate_size=37)
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
    pipe = assemble_sdxl(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


def draw_instance_images(folder: Path) -> list[Path]:
    """Five pictures of one toy (a ball with vertical red and white stripes) on different backgrounds, at different
    sizes, positions and PIL modes (RGB, RGBA, palette), as a user's phone photos would differ
    (`nara_diffusion.toy.image.draw_subject_images`)."""
    return draw_subject_images(folder)


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
