"""Goal 4: SDXL-architecture UNet, NaRA vs diffusers/peft LoRA: a DreamBooth training step and 30-step inference.

The UNet is ``UNet2DConditionModel`` with SDXL base's configuration (block_out_channels 320/640/1280, transformer depth
1/2/10, head dim 64, cross-attention dim 2048, ``text_time`` micro-conditioning with 2816 inputs, linear
projections), built on the meta device and materialised with random weights. ``--width_div`` divides the channel
widths (heads keep 64 dims) for CPU runs; ``--depth`` can shorten the transformer stacks; the latent size is set by
``--latent``. Both adapters sit on the same frozen weights, on diffusers' LoRA targets (``to_q, to_k, to_v, to_out.0``
of every attention) with the DreamBooth recipe's rank 4:

* **LoRA**: ``unet.add_adapter(LoraConfig(r, lora_alpha=r))`` (A and B random, so the branch is not zero);
* **NaRA**: ``nd.image.inject_nara(unet, NaRAConfig(r), scheduler=...)``; λ = t/T of each example from the ``timestep``.

Training step: ``DreamBoothModel`` (the library's loss: VAE posterior sample, t ~ U{0..999} and noise per example,
DDPM noising, UNet with pooled text embedding and time ids, MSE; prior preservation: one instance and one class
example) + backward + AdamW. Inference: what an SDXL pipeline does per image after encoding the prompt: 30 Euler
steps, each one UNet call on the doubled batch (classifier-free guidance, scale 5) and a scheduler step. The two
pipelines run in lockstep, one round per denoising step (step k of one, then step k of the other, the order
alternating), so that the machine's slow drifts cancel in the per-step ratios; each image starts from the same
latents for both.

    python benchmarks/image_step.py                          # CPU: width / 5, 32 × 32 latents (~2 min)
    python benchmarks/image_step.py --full                   # GPU: SDXL size, fp16 UNet, 128 × 128 latents
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

import _timing as T
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from peft import LoraConfig
from torch import nn

import nara_diffusion as nd
from nara_diffusion.image.dreambooth import DreamBoothModel
from nara_diffusion.image.unet import UNET_TARGET_MODULES

GOAL_TRAIN, GOAL_INFER = 1.03, 1.05
SDXL_CHANNELS = (320, 640, 1280)
SDXL_DEPTH = (1, 2, 10)
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="SDXL size: width-div 1, 128 × 128 latents, fp16 (GPU)")
    p.add_argument("--width_div", type=int, default=None, help="divide SDXL's channel widths (default: 5; full 1)")
    p.add_argument("--depth", type=int, nargs=3, default=list(SDXL_DEPTH), help="transformer layers per block")
    p.add_argument("--latent", type=int, default=None, help="latent side (default: 32; full 128 = 1024 px)")
    p.add_argument("--rank", type=int, default=4, help="adapter rank (the SDXL DreamBooth recipe's 4)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps of the inference run")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--dtype", default=None, help="UNet weights: float32 (CPU default) or float16/bfloat16 (GPU)")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_infer", action="store_true")
    T.add_device_arg(p)
    T.add_timing_args(p, repeats=10, warmup=1, max_seconds=75.0)
    p.add_argument("--infer_repeats", type=int, default=3, help="images per pipeline to time (each --steps steps)")
    p.add_argument("--quick", action="store_true", help="smoke run: depth 1 1 2, 16 × 16 latents, 4 steps, 3 rounds")
    args = p.parse_args(argv)
    args.width_div = args.width_div or (1 if args.full else 5)
    args.latent = args.latent or (128 if args.full else 32)
    if args.quick:
        args.depth, args.latent, args.steps, args.repeats, args.infer_repeats, args.warmup = [1, 1, 2], 16, 4, 3, 3, 1
    T.check_timing_args(p, args)
    return args


def sdxl_unet_config(width_div: int, depth: list[int]) -> dict[str, Any]:
    """SDXL base's UNet configuration with the channel widths divided by ``width_div`` (head size stays 64)."""
    channels = tuple(c // width_div for c in SDXL_CHANNELS)
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": channels,
        "layers_per_block": 2,
        "transformer_layers_per_block": tuple(depth),
        "attention_head_dim": tuple(max(1, c // 64) for c in channels),  # diffusers' name for the number of heads
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 6 time ids × 256 + the 1280-d pooled text embedding
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }


def build_unet(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """The UNet built on the meta device, then materialised on ``device`` with random weights."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config(args.width_div, args.depth))
    unet = unet.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm scales
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return unet.requires_grad_(False)


def shared_copy(model: nn.Module) -> nn.Module:
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def build_variants(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[UNet2DConditionModel, UNet2DConditionModel, DDPMScheduler]:
    unet = build_unet(args, device, dtype)
    scheduler = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
    lora = shared_copy(unet)
    # random A and B (init_lora_weights=False), as NaRA's init_weights=False: neither branch is a product with zeros
    lora.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=False, target_modules=UNET_TARGET_MODULES)
    )
    nara = shared_copy(unet)
    nd.image.inject_nara(nara, nd.NaRAConfig(r=args.rank, lora_dropout=0.0, init_weights=False), scheduler=scheduler)
    for model in (lora, nara):  # adapters in float32 (peft's autocast_adapter_dtype, diffusers' training scripts)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return lora, nara, scheduler


def conditioning(batch: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random prompt embeddings [N, 77, 2048], pooled [N, 1280] and time ids [N, 6] (1024 px, no crop)."""
    return {
        "embeds": torch.randn(batch, 77, 2048, generator=gen).to(device, dtype),
        "pooled": torch.randn(batch, 1280, generator=gen).to(device, dtype),
        "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch).to(device, dtype),
    }


def train_runner(
    unet: nn.Module, scheduler: DDPMScheduler, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> Callable[[dict[str, torch.Tensor]], None]:
    """One DreamBooth update (prior preservation: instance + class example) with the library's loss."""
    cond = conditioning(2, device, dtype, torch.Generator().manual_seed(args.seed))
    model = DreamBoothModel(
        unet, scheduler, resolution=1024, prompt_embeds=cond["embeds"], pooled_embeds=cond["pooled"]
    ).train()
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)

    def run(batch: dict[str, torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        gen = torch.Generator(device=device).manual_seed(int(batch["seed"]))
        model(batch, gen).backward()
        opt.step()

    return run


def train_batch(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> dict:
    shape = (2, 4, args.latent, args.latent)
    return {
        "latent_mean": torch.randn(shape, generator=gen).to(device, dtype),
        "latent_std": (0.1 * torch.rand(shape, generator=gen)).to(device, dtype),
        "original_sizes": torch.tensor([[1024, 1024]] * 2, device=device),
        "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long, device=device),
        "is_class": torch.tensor([False, True], device=device),
        "seed": torch.randint(0, 2**31, (1,), generator=gen),
    }


class Pipeline:
    """An SDXL pipeline's denoising loop after prompt encoding (Euler, CFG on a doubled batch), one step at a time,
    so that two pipelines can run in lockstep: step k of LoRA's run, then step k of NaRA's (or the reverse)."""

    def __init__(self, unet: nn.Module, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        self.unet, self.args, self.device = unet, args, device
        self.scheduler = EulerDiscreteScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading")
        cond = conditioning(2, device, dtype, torch.Generator().manual_seed(args.seed))  # [negative, prompt]
        self.embeds, self.added = cond["embeds"], {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        self.x = torch.empty(0)

    def start(self, latents: torch.Tensor) -> None:
        """A new image: the same initial latents for every pipeline (a fresh scheduler state)."""
        self.scheduler.set_timesteps(self.args.steps, device=self.device)
        self.x = latents * self.scheduler.init_noise_sigma

    def step(self, k: int) -> None:
        """Denoising step ``k``: one UNet call on [uncond; cond], guidance, one scheduler step."""
        t = self.scheduler.timesteps[k]
        x_in = self.scheduler.scale_model_input(torch.cat([self.x, self.x]), t)
        pred = self.unet(x_in, t, encoder_hidden_states=self.embeds, added_cond_kwargs=self.added, return_dict=False)[0]
        uncond, text = pred.chunk(2)
        self.x = self.scheduler.step(uncond + self.args.guidance * (text - uncond), t, self.x, return_dict=False)[0]


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, malloc, t_start, load = T.start_run(args)
    name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    lora, nara, scheduler = build_variants(args, device, dtype)
    timer = T.make_timer(device)
    n_adapted = sum(1 for m in nara.modules() if type(m).__name__ == "NaRALinear")
    base_params = sum(p.numel() for p in nara.parameters() if not p.requires_grad)
    print(T.machine_line(device, malloc))
    print(
        f"SDXL UNet: channels {tuple(c // args.width_div for c in SDXL_CHANNELS)}, depth {tuple(args.depth)}, "
        f"{base_params / 1e6:.0f} M frozen parameters, {n_adapted} adapted linears, latents {args.latent}², {dtype}; "
        f"rank {args.rank}; trainable LoRA {sum(p.numel() for p in lora.parameters() if p.requires_grad):,}, "
        f"NaRA {sum(p.numel() for p in nara.parameters() if p.requires_grad):,}"
    )
    results: list[str] = []
    gen = torch.Generator().manual_seed(args.seed + 1)
    if not args.skip_train:
        runs = [train_runner(m, scheduler, args, device, dtype) for m in (lora, nara)]
        phase, rows = T.run_rounds(
            [lambda b, r=r: timer(lambda: r(b)) for r in runs], lambda: train_batch(args, device, dtype, gen), args
        )
        lo, na = T.columns(rows)
        r = T.ratio_stats(na, lo)[0]
        print()
        print(T.markdown_table(["DreamBooth step", "median (IQR) ms", "/ LoRA [IQR]"],
                               [["LoRA", T.fmt_ms(lo), "1"], ["NaRA", T.fmt_ms(na), T.fmt_ratio(na, lo)]]))  # fmt: skip
        print()
        for line in phase.summary("training step", args.stall_factor, args.repeats):
            print(line)
        results.append(f"goal 4a  DreamBooth step NaRA / LoRA: {r:.3f} (≤ {GOAL_TRAIN}: {T.verdict(r, GOAL_TRAIN)})")
    if not args.skip_infer:
        for m in (lora, nara):
            m.eval()
        pipes = [Pipeline(m, args, device, dtype) for m in (lora, nara)]
        counter = iter(range(10**9))

        def next_step() -> int:
            """Round n is denoising step n mod steps of the current image; a new image every ``steps`` rounds."""
            k = next(counter) % args.steps
            if k == 0:
                x = torch.randn(1, 4, args.latent, args.latent, generator=gen).to(device, dtype)
                for pipe in pipes:
                    pipe.start(x)
            return k

        def timed(pipe: Pipeline) -> Callable[[int], float]:
            def go(k: int) -> float:
                with torch.no_grad():
                    return timer(lambda: pipe.step(k))

            return go

        repeats = args.infer_repeats * args.steps  # one round per denoising step
        infer_args = argparse.Namespace(
            **{
                **vars(args),
                "repeats": repeats,
                "warmup": args.steps * args.warmup,
                "max_seconds": 2 * args.max_seconds,
            }
        )
        phase, rows = T.run_rounds([timed(p) for p in pipes], next_step, infer_args)
        lo, na = T.columns(rows)
        r, rlo, rhi = T.ratio_stats(na, lo)
        per_run = [args.steps * 1e3 * statistics.median(c) for c in (lo, na)]
        print()
        print(
            T.markdown_table(
                ["inference (CFG)", "one step: median (IQR) ms", f"{args.steps} steps (ms)", "/ LoRA, per step [IQR]"],
                [
                    ["LoRA", T.fmt_ms(lo), f"{per_run[0]:.0f}", "1"],
                    ["NaRA", T.fmt_ms(na), f"{per_run[1]:.0f}", T.fmt_ratio(na, lo)],
                ],
            )
        )
        print()
        for line in phase.summary("inference steps", args.stall_factor, repeats):
            print(line)
        results.append(
            f"goal 4b  {args.steps}-step inference NaRA / LoRA: {r:.3f} [IQR {rlo:.3f}–{rhi:.3f}] per denoising step, "
            f"{per_run[1] / per_run[0]:.3f} for the {args.steps} steps (≤ {GOAL_INFER}: {T.verdict(r, GOAL_INFER)})"
        )
    print(load)
    print()
    print("\n".join(results))
    print(f"\n(total wall time {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
