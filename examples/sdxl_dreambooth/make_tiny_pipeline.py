"""Write a tiny random SDXL, SD3 or Flux pipeline (and, optionally, the 5 toy instance images) to folders.

The pipeline has SDXL's shape at toy size: a UNet2DConditionModel with ``addition_embed_type="text_time"``
(micro-conditioning), an AutoencoderKL with SDXL's 8× downsampling, two CLIP text encoders (the second with a
projection, giving the pooled embedding) and two CLIP tokenizers built from a small vocabulary written here, and
SDXL's Euler scheduler. It knows nothing (random weights): it exists so that DreamBooth training and inference
run end to end in seconds on a CPU. Real runs use ``stabilityai/stable-diffusion-xl-base-1.0``.

SD3 and Flux (``--family sd3|flux``) keep their real block structure at toy width: an MM-DiT transformer with
joint attention (Flux: double- and single-stream blocks, the guidance embedding, 2×2 latent packing), a 16-channel
style VAE with shift and scale, CLIP and T5 text encoders built from configs, and tokenizers built offline (CLIP:
byte-level BPE over a small vocabulary; T5: a word-level tokenizer over the same words), with the flow-matching
Euler scheduler.

    python examples/sdxl_dreambooth/make_tiny_pipeline.py outputs/tiny-sdxl
    python examples/sdxl_dreambooth/make_tiny_pipeline.py outputs/tiny-flux --family flux
    python examples/sdxl_dreambooth/make_tiny_pipeline.py outputs/tiny-sdxl \\
        --write_images examples/sdxl_dreambooth/images
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

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


def t5_tokenizer(words: list[str], max_length: int) -> Any:
    """A T5-style fast tokenizer built offline: whitespace-separated words from ``words`` (others are ``<unk>``),
    ``</s>`` appended, pad id 0 as in T5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _clip_config(vocab_size: int, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def _t5(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8
    )
    return T5EncoderModel(config)


def _flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 4-level (8× downsampling) VAE with 4 latent channels and the shift / scale SD3 and Flux apply."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny random SD3 pipeline (float32, eval mode): 2 MM-DiT blocks of width 32 (the last context-pre-only, as
    in SD3), two CLIP encoders with projections (pooled 2 × 16) and a T5 encoder (width 32)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(WORDS, MAX_LENGTH), clip_tokenizer(WORDS, MAX_LENGTH, pad_token="!")
    text_encoder = CLIPTextModelWithProjection(_clip_config(len(tokenizer), 16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer), 16))
    tokenizer_3 = t5_tokenizer(WORDS, MAX_LENGTH)
    text_encoder_3 = _t5(len(tokenizer_3))
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()
    return pipe


def build_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A tiny random Flux (dev-style, guidance-distilled) pipeline (float32, eval mode): one double-stream and one
    single-stream block of width 16, the guidance embedding, 2×2 latent packing, a CLIP encoder (pooled 32) and a
    T5 encoder (width 32)."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS, MAX_LENGTH)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer), 32))
    tokenizer_2 = t5_tokenizer(WORDS, MAX_LENGTH)
    text_encoder_2 = _t5(len(tokenizer_2))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × the 2×2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 2, 2),
    )
    vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


BUILDERS = {"sdxl": build_pipeline, "sd3": build_sd3_pipeline, "flux": build_flux_pipeline}


def draw_instance_images(folder: Path) -> list[Path]:
    """Five pictures of one toy (a ball with vertical red and white stripes) on different backgrounds, at different
    sizes, positions and PIL modes (RGB, RGBA, palette), as a user's phone photos would differ
    (`nara_diffusion.toy.image.draw_subject_images`)."""
    return draw_subject_images(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder for the pipeline (save_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(BUILDERS), default="sdxl", help="pipeline kind (default sdxl)")
    parser.add_argument("--write_images", type=Path, default=None, help="also write the 5 toy images here")
    args = parser.parse_args()
    BUILDERS[args.family](args.seed).save_pretrained(args.output_dir)
    print(f"tiny {args.family} pipeline written to {args.output_dir}")
    if args.write_images is not None:
        print("images:", ", ".join(str(p) for p in draw_instance_images(args.write_images)))


if __name__ == "__main__":
    main()
