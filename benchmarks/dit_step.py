"""Issue 16: SD3 / Flux diffusion transformers, NaRA vs diffusers/peft LoRA: a DreamBooth step and 20-step inference.

The transformers are diffusers' ``SD3Transformer2DModel`` (SD3-medium's configuration: 24 MM-DiT blocks, head size
64, 24 heads, joint attention with context dimension 4096, 16 latent channels, patch 2) and
``FluxTransformer2DModel`` (Flux-dev's: 19 double-stream and 38 single-stream blocks, head size 128, 24 heads,
guidance embedding, 2×2 packed 16-channel latents), built on the meta device and materialised with random weights.
``--heads`` divides the width (the head size stays), ``--depth`` can shorten the stacks, ``--latent`` and
``--text_len`` set the token counts. Both adapters sit on the same frozen weights, on the attention projections
with the joint-attention context projections (NaRA's default targets for SD3 / Flux, also given to LoRA), rank 4:

* **LoRA**: ``transformer.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights=False))``;
* **NaRA**: ``nd.image.inject_nara(transformer, NaRAConfig(r, lora_dropout=0, init_weights=False), scheduler=...)``,
  λ = σ.

Training step: `FlowMatchingModel` (the library's loss: VAE posterior sample, σ from the logit-normal density per
example, flow-matching noising, velocity regression; prior preservation: one instance and one class example) +
backward + AdamW. Inference: 20 flow-matching Euler steps after prompt encoding, SD3 with classifier-free guidance
(one call on the doubled batch), Flux with its guidance embedding (batch 1); the two pipelines in lockstep (step k
of one, then step k of the other, the order alternating), each image from the same latents for both.

    python benchmarks/dit_step.py --threads 1               # CPU: 4 heads, SD3 6 blocks, Flux 2 + 4, 16² latents
    python benchmarks/dit_step.py --full --dtype bfloat16   # GPU: SD3-medium and Flux-dev shapes, peak memory
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
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig
from torch import nn

import nara_diffusion as nd
from nara_diffusion.image.denoisers import FAMILY_BY_NAME
from nara_diffusion.image.flow_matching import FlowMatchingModel

GOAL_TRAIN, GOAL_INFER = 1.03, 1.05
FULL_HEADS = 24
FULL_DEPTH = {"sd3": [24], "flux": [19, 38]}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd3", "flux", "both"], default="both")
    p.add_argument("--full", action="store_true", help="SD3-medium / Flux-dev shapes, 128 × 128 latents (GPU)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4 on CPU; full 24)")
    p.add_argument("--depth", type=int, nargs="+", default=None, help="blocks (SD3: one number; Flux: double single)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 16; full 128 = 1024 px)")
    p.add_argument("--text_len", type=int, default=None, help="prompt tokens (default 32 on CPU; full 333 / 512)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the inference run")
    p.add_argument("--guidance", type=float, default=5.0, help="SD3 classifier-free guidance")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 / float16 (GPU)")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_infer", action="store_true")
    T.add_device_arg(p)
    T.add_timing_args(p, repeats=8, warmup=1, max_seconds=90.0)
    p.add_argument("--infer_repeats", type=int, default=2, help="images per pipeline to time (each --steps steps)")
    p.add_argument("--quick", action="store_true", help="smoke run: depth 2 (Flux 1 2), 16² latents, 3 steps")
    args = p.parse_args(argv)
    args.heads = args.heads or (FULL_HEADS if args.full else 4)
    args.latent = args.latent or (128 if args.full else 16)
    if args.quick:
        args.latent, args.steps, args.repeats, args.infer_repeats, args.warmup = 16, 3, 3, 2, 1
    T.check_timing_args(p, args)
    return args


def depth_of(family: str, args: argparse.Namespace) -> list[int]:
    if args.depth:
        return list(args.depth)
    if args.quick:
        return [2] if family == "sd3" else [1, 2]
    if args.full:
        return FULL_DEPTH[family]
    return [6] if family == "sd3" else [2, 4]  # CPU: the real blocks, fewer of them (Flux keeps 1 : 2)


def transformer_config(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """SD3-medium's / Flux-dev's transformer configuration with ``args.heads`` heads and the chosen depth."""
    depth = depth_of(family, args)
    if family == "sd3":
        return dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=depth[0],
            attention_head_dim=64,
            num_attention_heads=args.heads,
            joint_attention_dim=4096,
            caption_projection_dim=64 * args.heads,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        )
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=depth[0],
        num_single_layers=depth[1],
        attention_head_dim=128,
        num_attention_heads=args.heads,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def build(family: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    with torch.device("meta"):
        model = cls(**transformer_config(family, args))
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.requires_grad_(False)


def shared_copy(model: nn.Module) -> nn.Module:
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def variants(family: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    base = build(family, args, device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if family == "sd3" else 1.0)
    targets = list(FAMILY_BY_NAME[family].target_modules)
    lora = shared_copy(base)
    lora.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=False, target_modules=targets))
    nara = shared_copy(base)
    # no adapter dropout on either side (the DreamBooth recipe; NaRAConfig's own default is the authors' 0.05)
    nd.image.inject_nara(nara, nd.NaRAConfig(r=args.rank, lora_dropout=0.0, init_weights=False), scheduler=scheduler)
    for model in (lora, nara):  # adapters in float32, as diffusers' training scripts keep them
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return lora, nara, scheduler


def text_len(family: str, args: argparse.Namespace) -> int:
    return args.text_len or ((333 if family == "sd3" else 512) if args.full else 32)


def conditioning(family: str, batch: int, args: argparse.Namespace, device, dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    pooled = 2048 if family == "sd3" else 768
    out = {
        "embeds": torch.randn(batch, text_len(family, args), 4096, generator=gen).to(device, dtype),
        "pooled": torch.randn(batch, pooled, generator=gen).to(device, dtype),
    }
    if family == "flux":
        out["text_ids"] = torch.zeros(text_len(family, args), 3, device=device, dtype=dtype)
    return out


def channels(family: str) -> int:
    return 16  # both use 16-channel latents (Flux packs them to 64 per 2×2 patch)


def train_runner(family: str, model: nn.Module, scheduler: Any, args, device, dtype) -> Callable[[dict], None]:
    cond = conditioning(family, 2, args, device, dtype)
    loss_model = FlowMatchingModel(
        model,
        FlowMatchEulerDiscreteScheduler.from_config(scheduler.config),
        family=family,
        prompt_embeds=cond["embeds"],
        pooled_embeds=cond["pooled"],
        text_ids=cond.get("text_ids"),
        weighting_scheme="logit_normal",
    ).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)

    def run(batch: dict[str, torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        gen = torch.Generator(device=device).manual_seed(int(batch["seed"]))
        loss_model(batch, gen).backward()
        opt.step()

    return run


def train_batch(family: str, args, device, dtype, gen: torch.Generator) -> dict:
    shape = (2, channels(family), args.latent, args.latent)
    return {
        "latent_mean": torch.randn(shape, generator=gen).to(device, dtype),
        "latent_std": (0.1 * torch.rand(shape, generator=gen)).to(device, dtype),
        "is_class": torch.tensor([False, True], device=device),
        "seed": torch.randint(0, 2**31, (1,), generator=gen),
    }


class Pipeline:
    """The denoising loop of StableDiffusion3Pipeline / FluxPipeline after prompt encoding, one step at a time."""

    def __init__(self, family: str, model: nn.Module, args, device, dtype) -> None:
        self.family, self.model, self.args, self.device, self.dtype = family, model, args, device, dtype
        shift = 3.0 if family == "sd3" else 1.0
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        self.cond = conditioning(family, 2 if family == "sd3" else 1, args, device, dtype)  # SD3: [negative, prompt]
        side = args.latent // 2
        self.image_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype)
        self.x = torch.empty(0)

    def start(self, latents: torch.Tensor) -> None:
        self.scheduler.set_timesteps(self.args.steps, device=self.device)
        self.x = latents

    def step(self, k: int) -> None:
        t = self.scheduler.timesteps[k]
        if self.family == "sd3":
            x_in = torch.cat([self.x, self.x])
            pred = self.model(
                hidden_states=x_in,
                timestep=t.expand(2),
                encoder_hidden_states=self.cond["embeds"],
                pooled_projections=self.cond["pooled"],
                return_dict=False,
            )[0]
            uncond, text = pred.chunk(2)
            pred = uncond + self.args.guidance * (text - uncond)
        else:
            pred = self.model(
                hidden_states=self.x,
                timestep=t.expand(1).to(self.dtype) / 1000,
                guidance=torch.full((1,), 3.5, device=self.device),
                pooled_projections=self.cond["pooled"],
                encoder_hidden_states=self.cond["embeds"],
                txt_ids=self.cond["text_ids"],
                img_ids=self.image_ids,
                return_dict=False,
            )[0]
        self.x = self.scheduler.step(pred, t, self.x, return_dict=False)[0]


def initial_latents(family: str, args, device, dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(1, channels(family), args.latent, args.latent, generator=gen).to(device, dtype)
    if family == "flux":
        x = FluxPipeline._pack_latents(x, 1, channels(family), args.latent, args.latent)
    return x


def bench_family(family: str, args, device, dtype, timer) -> list[str]:
    lora, nara, scheduler = variants(family, args, device, dtype)
    n_adapted = sum(1 for m in nara.modules() if type(m).__name__ == "NaRALinear")
    frozen = sum(p.numel() for p in nara.parameters() if not p.requires_grad)
    print(
        f"\n{family}: {args.heads} heads (width {args.heads * (64 if family == 'sd3' else 128)}), depth "
        f"{depth_of(family, args)}, {frozen / 1e6:.0f} M frozen parameters, {n_adapted} adapted linears, latents "
        f"{args.latent}², {text_len(family, args)} text tokens, {dtype}; rank {args.rank}; trainable LoRA "
        f"{sum(p.numel() for p in lora.parameters() if p.requires_grad):,}, NaRA "
        f"{sum(p.numel() for p in nara.parameters() if p.requires_grad):,}"
    )
    results: list[str] = []
    gen = torch.Generator().manual_seed(args.seed + 1)
    if not args.skip_train:
        runs = [train_runner(family, m, scheduler, args, device, dtype) for m in (lora, nara)]
        phase, rows = T.run_rounds(
            [lambda b, r=r: timer(lambda: r(b)) for r in runs],
            lambda: train_batch(family, args, device, dtype, gen),
            args,
        )
        lo, na = T.columns(rows)
        r = T.ratio_stats(na, lo)[0]
        print(T.markdown_table(["DreamBooth step", "median (IQR) ms", "/ LoRA [IQR]"],
                               [["LoRA", T.fmt_ms(lo), "1"], ["NaRA", T.fmt_ms(na), T.fmt_ratio(na, lo)]]))  # fmt: skip
        for line in phase.summary(f"{family} training step", args.stall_factor, args.repeats):
            print(line)
        results.append(f"{family}: DreamBooth step NaRA / LoRA: {r:.3f} (≤ {GOAL_TRAIN}: {T.verdict(r, GOAL_TRAIN)})")
        if device.type == "cuda":
            peaks = [
                T.cuda_peak_bytes(lambda r=r: r(train_batch(family, args, device, dtype, gen)), device) for r in runs
            ]
            results.append(
                f"{family}: training peak memory LoRA {peaks[0] / T.GiB:.2f} GiB, NaRA {peaks[1] / T.GiB:.2f} GiB"
            )
    if not args.skip_infer:
        for m in (lora, nara):
            m.eval()
        pipes = [Pipeline(family, m, args, device, dtype) for m in (lora, nara)]
        counter = iter(range(10**9))

        def next_step() -> int:
            k = next(counter) % args.steps
            if k == 0:
                x = initial_latents(family, args, device, dtype, gen)
                for pipe in pipes:
                    pipe.start(x)
            return k

        def timed(pipe: Pipeline) -> Callable[[int], float]:
            def go(k: int) -> float:
                with torch.no_grad():
                    return timer(lambda: pipe.step(k))

            return go

        repeats = args.infer_repeats * args.steps
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
        print(
            T.markdown_table(
                ["inference", "one step: median (IQR) ms", f"{args.steps} steps (ms)", "/ LoRA, per step [IQR]"],
                [
                    ["LoRA", T.fmt_ms(lo), f"{per_run[0]:.0f}", "1"],
                    ["NaRA", T.fmt_ms(na), f"{per_run[1]:.0f}", T.fmt_ratio(na, lo)],
                ],
            )
        )
        for line in phase.summary(f"{family} inference steps", args.stall_factor, repeats):
            print(line)
        results.append(
            f"{family}: {args.steps}-step inference NaRA / LoRA: {r:.3f} [IQR {rlo:.3f}–{rhi:.3f}] per step "
            f"(≤ {GOAL_INFER}: {T.verdict(r, GOAL_INFER)})"
        )
    return results


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, malloc, t_start, load = T.start_run(args)
    name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    timer = T.make_timer(device)
    print(T.machine_line(device, malloc))
    results: list[str] = []
    for family in ["sd3", "flux"] if args.family == "both" else [args.family]:
        results += bench_family(family, args, device, dtype, timer)
    print(load)
    print()
    print("\n".join(results))
    print(f"\n(total wall time {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
