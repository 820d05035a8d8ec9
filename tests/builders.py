"""Small models, tokenizers, pipelines and data built inside the tests (no downloads), shared by the test modules.

Each builder seeds itself, so a test gets the same weights whichever tests ran before it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import peft
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
LLADA_EXAMPLE = ROOT / "examples" / "llada"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads and restore the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# -- tiny LLaDA ---------------------------------------------------------------------------------------------------
#: Vocabulary size and special token ids of `tiny_llada`.
V, MASK, EOS, PAD = 20, 19, 1, 0


def tiny_llada_config(tokenizer: Any = None, **overrides: Any):
    """The one tiny `LLaDAConfig` of the tests: 2 blocks of width 32 (4 heads, MLP 64), 64 positions, RoPE θ 10⁴ and
    the vocabulary of `tiny_llada`, or the size and special token ids of ``tokenizer``; ``overrides`` win."""
    from nara_diffusion.text.llada import LLaDAConfig

    vocab = V if tokenizer is None else len(tokenizer)
    fields: dict[str, Any] = dict(
        d_model=32,
        n_heads=4,
        n_kv_heads=4,
        n_layers=2,
        mlp_hidden_size=64,
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=64,
        rope_theta=10000.0,
        mask_token_id=MASK if tokenizer is None else tokenizer.mask_token_id,
        eos_token_id=EOS if tokenizer is None else tokenizer.eos_token_id,
        pad_token_id=PAD if tokenizer is None else tokenizer.pad_token_id,
    )
    fields.update(overrides)
    return LLaDAConfig(**fields)


def tiny_llada(seed: int = 0, eos_always: bool = False):
    """A random LLaDA whose logits vary a lot (init_std 0.5) and that, like a trained one, never predicts [MASK]:
    a constant feature (ln_f bias) feeds a -100 logit for the mask token (or +100 for EOS with ``eos_always``)."""
    from nara_diffusion.text.llada import LLaDAModelLM

    config = tiny_llada_config(init_std=0.5, bias_for_layer_norm=True)
    torch.manual_seed(seed)
    model = LLaDAModelLM(config).eval()
    with torch.no_grad():
        model.model.transformer["ln_f"].weight[0] = 0.0
        model.model.transformer["ln_f"].bias[0] = 1.0
        head = model.model.transformer["ff_out"].weight
        head[:, 0] = 0.0
        head[MASK, 0] = -100.0
        if eos_always:
            head[EOS, 0] = 100.0
    return model


def noise_bins(base: nn.Module, bins: list[int]) -> peft.PeftModel:
    """A noise-bin set on ``base``: one random LoRA (r=2 on q/v) per bin ``k``, named ``noise_bin_{k}``."""
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config, adapter_name=f"noise_bin_{bins[0]}")
    for k in bins[1:]:
        torch.manual_seed(k)
        model.add_adapter(f"noise_bin_{k}", config)
    return model.eval()


def profile_data():
    """Three short examples in `tiny_llada`'s vocabulary (prompts of 2, 3 and 2 tokens), for noise profiles."""
    from nara_diffusion.text.data import SFTDataset

    sequences = [[5, 6, 7, 8, 9, EOS], [10, 11, 12, 13, EOS], [14, 15, 16, 17, 18, 2, EOS]]
    return SFTDataset(sequences, [2, 3, 2], max_length=10, eos_token_id=EOS)


def example_module(path: Path, name: Optional[str] = None) -> ModuleType:
    """Import an example script by path as module ``name`` (the examples are not a package; their folder is on
    ``sys.path`` while it imports, as when it runs: evaluate.py imports generate.py)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name or path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def failure_of(main: Callable[[Sequence[str]], object], argv: Sequence[str]) -> str:
    """Run a script's ``main(argv)`` in this process, expecting it to fail as its command line would (an exception,
    or argparse's exit with a non-zero status), and return the message a user would see: the exception's text and
    what went to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            assert exc.code not in (0, None), f"{argv} exited with status {exc.code}"
            return err.getvalue()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}\n{err.getvalue()}"
    raise AssertionError(f"{argv} did not fail")


def make_tiny_base() -> ModuleType:
    """examples/llada/make_tiny_base.py as a module (its ``char_tokenizer`` and ``main``)."""
    return example_module(LLADA_EXAMPLE / "make_tiny_base.py", "make_tiny_base")


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
SDXL_EXAMPLE = ROOT / "examples" / "sdxl_dreambooth"


def _example_module(name: str) -> ModuleType:
    """Import a script of examples/sdxl_dreambooth by path (the examples are not a package)."""
    return example_module(SDXL_EXAMPLE / f"{name}.py", f"sdxl_example_{name}")


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


# -- the authors' adapter format ----------------------------------------------------------------------------------
def reference_folder(path: Path, r: int = 3, h1: int = 16, h2: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """An adapter folder laid out as the authors' code writes it, with random (trained-looking) tensors."""
    gen = torch.Generator().manual_seed(seed)
    config = {
        "peft_type": "NARA",
        "r_ab": r,
        "c_scale": 0.1,
        "scale_ab": 1.0,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": ["layers.0", "layers.2"],
        "embedding_type": "fourier",
        "embedding_dim": 64,
        "fnn_hidden_size_1": h1,
        "fnn_hidden_size_2": h2,
        "input_mode": "nl",
        "mapper_groups": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_c": "zero_last",
        "base_model_name_or_path": None,
        "task_type": None,
        "inference_mode": True,
    }
    state = {"base_model.embedding_layers.NL_emb.W": torch.randn(1, 32, generator=gen) * 16}
    for i, (d_in, d_out) in zip((0, 2, 4), ((64, h1), (h1, h2), (h2, r * r)), strict=False):
        state[f"base_model.global_mapper.model.{i}.weight"] = torch.randn(d_out, d_in, generator=gen) * 0.3
        state[f"base_model.global_mapper.model.{i}.bias"] = torch.randn(d_out, generator=gen) * 0.1
    for layer in (0, 2):
        state[f"base_model.model.layers.{layer}.lora_A"] = torch.randn(r, 12, generator=gen) * 0.3
        state[f"base_model.model.layers.{layer}.lora_B"] = torch.randn(12, r, generator=gen) * 0.3
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    torch.save(state, path / "adapter_model.bin")
    return state


def dreambooth_config(tmp_path: Path, **overrides: Any):
    """A `DreamBoothConfig` for a few updates on the five example images at 64 px (3 updates unless overridden)."""
    from nara_diffusion.image.dreambooth import DreamBoothConfig

    options: dict[str, Any] = dict(
        instance_data_dir=str(SDXL_EXAMPLE / "images"),
        instance_prompt="a photo of sks toy",
        output_dir=str(tmp_path / "run"),
        resolution=64,
        max_steps=3,
        grad_accum=1,
        learning_rate=1e-2,
        eval_every=0,
        num_inference_steps=2,
        report_to="none",
    )
    options.update(overrides)
    return DreamBoothConfig(**options)


def regression_data(n: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` examples ``{"x": [12], "y": [5]}`` for a `TinyNet` trained by the Trainer."""
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(12, generator=gen), "y": torch.randn(5, generator=gen)} for _ in range(n)]


def stack_collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def regression_loss(model: nn.Module, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Squared error at a random λ per example drawn from the Trainer's generator."""
    lam = torch.rand(batch["x"].shape[0], generator=gen)
    return (model(batch["x"], noise_level=lam) - batch["y"]).pow(2).mean()


def tiny_sd3_pipeline(seed: int = 0):
    """The tiny random SD3 pipeline of examples/sdxl_dreambooth/make_tiny_pipeline.py (MM-DiT with joint attention,
    two CLIP encoders and a T5, tokenizers built offline, flow-matching Euler scheduler)."""
    pipe = _example_module("make_tiny_pipeline").build_sd3_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0):
    """The tiny random Flux pipeline of examples/sdxl_dreambooth/make_tiny_pipeline.py (double- and single-stream
    blocks, guidance embedding, 2×2 latent packing, CLIP + T5, tokenizers built offline)."""
    pipe = _example_module("make_tiny_pipeline").build_flux_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- tiny Dream ---------------------------------------------------------------------------------------------------
#: Dream-v0-Instruct-7B's config.json (Hub), the source of every Dream test config's field names and auto_map.
DREAM_HUB_7B: dict[str, Any] = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def tiny_dream_config(tokenizer: Any = None, **overrides: Any):
    """A tiny `DreamConfig` with the Hub's fields: width 32, 4 query heads sharing 2 key/value heads (GQA), 2 layers,
    MLP 48, RoPE θ 100 (so positions matter at a dozen tokens), the vocabulary of `tiny_llada` or of ``tokenizer``;
    ``overrides`` win."""
    from nara_diffusion.text.dream import DreamConfig

    fields = {k: v for k, v in DREAM_HUB_7B.items() if k not in ("auto_map", "torch_dtype", "transformers_version")}
    fields.update(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=48,
        max_position_embeddings=64, rope_theta=100.0, vocab_size=V if tokenizer is None else len(tokenizer),
        mask_token_id=MASK if tokenizer is None else tokenizer.mask_token_id,
        eos_token_id=EOS if tokenizer is None else tokenizer.eos_token_id,
        pad_token_id=EOS if tokenizer is None else tokenizer.eos_token_id,
        bos_token_id=EOS if tokenizer is None else tokenizer.eos_token_id,
    )  # fmt: skip
    fields.update(overrides)
    return DreamConfig(**fields)


def tiny_dream(seed: int = 0, scale: float = 0.25, tokenizer: Any = None, **overrides: Any):
    """A random tiny `DreamModel` (eval mode) with weights large enough for sharp attention and non-trivial norm
    weights and biases, so that a wrong position, mask, bias or shift shows in the logits."""
    from nara_diffusion.text.dream import DreamModel

    torch.manual_seed(seed)
    model = DreamModel(tiny_dream_config(tokenizer, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else scale * torch.randn_like(p))
    return model


def save_hub_dream(model: nn.Module, folder: Path, tokenizer: Any = None) -> Path:
    """``model`` saved as the Hub lays Dream out: safetensors with the Hub's key names and a config.json with the
    Hub's auto_map (remote code that is not there), bf16 dtype and transformers version; plus ``tokenizer``."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        auto_map=DREAM_HUB_7B["auto_map"], torch_dtype="bfloat16", transformers_version="4.46.2", rope_scaling=None
    )
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
