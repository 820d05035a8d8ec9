"""Small models built from configs inside the tests (no downloads) and an independent NaRA formula."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn


def f32_tol(reduction_len: int, magnitude: float = 1.0, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance for comparing two float computations of the same quantity that differ only in rounding: a
    batch vs one example at a time (the GEMM kernel blocks the problem differently), another summation order or
    implementation, another SIMD width (``ATEN_CPU_CAPABILITY``) or thread count. Use ``rtol=0``: the error scales
    with the magnitude of the whole computation, not with each element, so small elements need the same atol.

    Bound: one length-K reduction whose values are of size ≤ M is off by about √K·u·M (u = eps/2; the K roundings
    are independent and add in quadrature, the probabilistic form of Higham's K·u·M worst case, which real data never
    approaches). ``depth`` chained reductions (each matmul, conv, norm, softmax on the longest path; a network with
    normalised layers passes earlier errors on at gain ≈ 1) add theirs the same way, so each result is off by about
    √(depth·K)·u·M, and two results differ by at most about twice that. The tolerance is 4·√(depth·K)·eps·M, i.e.
    four times that difference: room for the tail of the error distribution over many outputs, and for gains a
    little above 1 (it is far below any real bug, which changes results by orders of magnitude more).

    Only the product depth·K, the number of roundings on the path, matters: for reductions of different lengths pass
    their sum as ``reduction_len`` (``depth=1``), or a typical length and their count.

    Args:
        reduction_len: K, the length of the reductions (hidden width, kernel size × channels, sequence length, ...).
        magnitude: M, the size of the values the reductions produce. After a normalisation (LayerNorm, RMSNorm,
            GroupNorm) earlier errors shrink with the values, so for a normalised network M is the output's scale;
            where nothing renormalises (tanh MLPs, perturbed adapter branches, a core C(λ) far from I) it is the
            largest intermediate.
        depth: Chained reductions on the longest path (each matmul, conv, norm, softmax).
        dtype: ``torch.float32`` (eps = 2⁻²³ ≈ 1.19e-7), or ``torch.float64`` / ``torch.bfloat16`` for their eps.
    """
    return 4.0 * math.sqrt(depth * reduction_len) * torch.finfo(dtype).eps * magnitude


class TinyNet(nn.Module):
    """Linear stack with tanh between layers: each layer's input is known, so the expected output of the
    adapted model can be computed by hand."""

    def __init__(self, d: int = 12, n_layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n_layers))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def reference_core(hyper: dict[str, torch.Tensor], lam: torch.Tensor, r: int, eta: float) -> torch.Tensor:
    """C(λ) = I + η·reshape(MLP(sin/cos(λ·W))), written with plain tensor ops. ``lam``: [B] → [B, r, r]."""
    proj = lam[:, None] * hyper["W"]  # [B, m/2]
    h = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
    n_linear = len([k for k in hyper if k.startswith("w")])
    for i in range(n_linear):
        h = h @ hyper[f"w{i}"].T + hyper[f"b{i}"]
        if i < n_linear - 1:
            h = h * torch.sigmoid(h)
    return torch.eye(r) + eta * h.view(-1, r, r)


def reference_lowrank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, s: float) -> torch.Tensor:
    """s·B·Cᵀ·A·x per example in column form; ``x``: [B, ..., d_in], ``C``: [B, r, r]."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i].reshape(-1, x.shape[-1]).T  # [d_in, N]
        yi = s * (B @ C[i].T @ A @ xi)  # [d_out, N]
        out.append(yi.T.reshape(*x.shape[1:-1], B.shape[0]))
    return torch.stack(out)


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def perturb_(module: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Give every NaRA parameter a random non-zero value (B and the last hypernet layer start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "nara_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


CHAT_TEMPLATE = (
    "<|bos|>{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)


def tiny_chat_tokenizer(chat_template: bool = True, eos: bool = True):
    """A word-level fast tokenizer built in memory (no downloads): whitespace-split words from a small vocabulary,
    special tokens ``<|bos|>`` (added in front of plain encodings), ``<|eos|>``, ``<|mask|>``, ``<|user|>``,
    ``<|end|>``, ``<|assistant|>``, and a one-line chat template
    (``<|bos|><|user|> {prompt} <|end|> <|assistant|>`` with the generation prompt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", *"a b c d e f g h what is two plus three the answer def f(x): return x print".split()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<|bos|>", "<|eos|>", "<|mask|>", "<|user|>", "<|end|>", "<|assistant|>"])
    bos_id = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos_id)])
    specials = {"unk_token": "[UNK]", "bos_token": "<|bos|>", "mask_token": "<|mask|>"}
    if eos:
        specials["eos_token"] = "<|eos|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, additional_special_tokens=["<|user|>", "<|end|>", "<|assistant|>"], **specials
    )
    tok.chat_template = CHAT_TEMPLATE if chat_template else None
    return tok


# -- tiny diffusers pipelines (no downloads) ------------------------------------------------------------------
SDXL_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sdxl_dreambooth"


def _example_module(name: str):
    """Import a script of examples/sdxl_dreambooth by path (the examples are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"sdxl_example_{name}", SDXL_EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sdxl_pipeline(seed: int = 0):
    """The tiny random SDXL pipeline of examples/sdxl_dreambooth/make_tiny_pipeline.py (tiny UNet with text_time
    micro-conditioning, 8× VAE, two CLIP encoders, CLIP tokenizers from a small vocabulary written there)."""
    pipe = _example_module("make_tiny_pipeline").build_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(seed: int = 0):
    """A tiny SD 1.5-style pipeline: one CLIP encoder, a UNet without added conditioning, DDIM sampling."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sdxl = tiny_sdxl_pipeline(seed)  # reuse its VAE and tokenizer
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(sdxl.tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=sdxl.tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
    )
    pipe = StableDiffusionPipeline(
        vae=sdxl.vae,
        text_encoder=text_encoder,
        tokenizer=sdxl.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = "a photo of sks toy", seed: int = 0, **kwargs):
    """Three denoising steps at 64×64 with a fixed seed, as a numpy array ``[N, 64, 64, 3]``."""
    options = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


def perturb_nara_(*modules: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """`perturb_` over several modules (a pipeline's UNet and text encoders)."""
    for i, module in enumerate(modules):
        perturb_(module, scale=scale, seed=seed + i)


def free_port() -> int:
    """A TCP port free on this machine now, for a multi-process launch that must not meet another run's."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
