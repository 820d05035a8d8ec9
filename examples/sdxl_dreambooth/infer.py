"""Generate images with a DreamBooth adapter in a stock diffusers pipeline (NaRA or LoRA, whichever the folder holds;
SDXL, SD 1.5 / 2.x, SD3 or Flux, whichever it was trained on).

    python examples/sdxl_dreambooth/infer.py --adapter_path outputs/dreambooth/final \\
        --prompt "a photo of sks dog in a bucket"

The base model is the one recorded at training time (``--model`` overrides it). The pictures are saved side by side
in one PNG, ``<output_dir>/images.png``.
"""

import argparse
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from nara_diffusion.image.dreambooth import load_trained_pipeline

OUTPUT_NAME = "images.png"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--adapter_path", type=Path, required=True, help="the final/ folder of a training run")
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument(
        "--model",
        "--pretrained_model_name_or_path",
        default=None,
        help="base pipeline, Hub id or folder (default: the one the adapter was trained on)",
    )
    parser.add_argument("--num_images", type=int, default=4, help="pictures of the prompt")
    parser.add_argument("--num_inference_steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="classifier-free guidance")
    parser.add_argument("--resolution", type=int, default=None, help="side in pixels (default: the pipeline's)")
    parser.add_argument("--scale", type=float, default=1.0, help="strength of the NaRA adapter (set_nara_scale)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pictures")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--output_dir", type=Path, default=Path("."), help="folder of images.png")
    args = parser.parse_args()

    pipe = load_trained_pipeline(args.adapter_path, args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    if hasattr(pipe, "set_nara_scale"):
        pipe.set_nara_scale(args.scale)
    images = pipe(
        args.prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    ).images
    args.output_dir.mkdir(parents=True, exist_ok=True)
    output = args.output_dir / OUTPUT_NAME
    make_image_grid(images, rows=1, cols=len(images)).save(output)
    print(f"{len(images)} images of {args.prompt!r} saved to {output}")


if __name__ == "__main__":
    main()
