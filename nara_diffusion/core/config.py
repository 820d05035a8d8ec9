"""`NaRAConfig`: the peft-style configuration of a NaRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

#: The peft type string under which NaRA is registered (see `core/tuner.py`).
NARA_PEFT_TYPE = "NARA"

CORES = ("noise", "constant", "identity")
EMBEDDINGS = ("fourier", "mlp", "raw")
NOISE_INPUTS = ("mask_ratio", "timestep")


@dataclass
class NaRAConfig(PeftConfig):
    """Configuration of a NaRA (Noise-Aware LoRA) adapter.

    Every adapted linear layer computes ``h = W0·x + s · B · C(λ)ᵀ · A · dropout(x)`` where ``A`` (r × d_in) and
    ``B`` (d_out × r) belong to the layer and the r × r core ``C(λ) = I + core_scale · reshape(F(e(λ)))`` comes from
    one hypernetwork ``F`` shared by the whole model.

    Args:
        r: Rank of the adapter (size of the r × r core).
        target_modules: Modules to adapt, with peft's semantics: a list of name suffixes, a regex string matched
            against the full module name, or ``"all-linear"``. ``None`` uses the default for known architectures
            (LLaDA: ``q_proj, k_proj, v_proj, attn_out``).
        exclude_modules: Modules never to adapt (same semantics as ``target_modules``).
        core_scale: η, the weight of the hypernetwork output added to the identity (authors' configs: 0.1).
        lora_dropout: Dropout applied to the layer input before ``A``.
        scaling: s, the multiplier of the low-rank branch (authors' convention: 1.0, no alpha/r factor).
        lora_alpha: If set, ``s = scaling · lora_alpha / r`` (peft LoRA's convention); ``None`` keeps ``s = scaling``.
        embedding: Embedding of λ fed to the hypernetwork: ``"fourier"`` (fixed Gaussian Fourier features),
            ``"mlp"`` (learned ``Linear(1→embedding_dim) → SiLU``) or ``"raw"`` (λ itself, one input).
        embedding_dim: Width of the ``fourier``/``mlp`` embedding (even for ``fourier``).
        fourier_scale: σ of the Gaussian Fourier frequencies (no 2π factor, as in the authors' code).
        hidden_dims: Hidden widths of the hypernetwork MLP (SiLU between layers; the last layer starts at zero).
        core: ``"noise"`` (NaRA), ``"constant"`` (NaRA-C: a learned r × r core with no noise input) or
            ``"identity"`` (C = I, i.e. plain LoRA through the same code).
        noise_input: What callers pass as the noise level: ``"mask_ratio"`` (λ ∈ [0, 1], text) or ``"timestep"``
            (a diffusion timestep t ∈ [0, num_train_timesteps], converted to λ = t / num_train_timesteps).
        num_train_timesteps: Number of diffusion training timesteps, used when ``noise_input="timestep"``.
        modules_to_save: Extra modules (by name) to train fully and save with the adapter.
        layers_to_transform: Only adapt these layer indices (peft semantics).
        layers_pattern: Name of the layer list used with ``layers_to_transform`` (peft semantics).
        init_weights: ``True`` initialises B to zero (the adapted model starts equal to the base model); ``False``
            initialises B like A, for tests and debugging.
    """

    r: int = field(default=32, metadata={"help": "Adapter rank (size of the r x r core)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module name suffixes, a regex, or 'all-linear'."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    core_scale: float = field(default=0.1, metadata={"help": "eta: weight of the hypernetwork output."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the input of A."})
    scaling: float = field(default=1.0, metadata={"help": "s: multiplier of the low-rank branch."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "If set, s = scaling * lora_alpha / r."})
    embedding: Literal["fourier", "mlp", "raw"] = field(default="fourier", metadata={"help": "Embedding of lambda."})
    embedding_dim: int = field(default=64, metadata={"help": "Width of the lambda embedding."})
    fourier_scale: float = field(default=16.0, metadata={"help": "sigma of the Gaussian Fourier frequencies."})
    hidden_dims: tuple[int, ...] = field(default=(256, 512), metadata={"help": "Hidden widths of the hypernetwork."})
    core: Literal["noise", "constant", "identity"] = field(default="noise", metadata={"help": "Core variant."})
    noise_input: Literal["mask_ratio", "timestep"] = field(
        default="mask_ratio", metadata={"help": "Kind of noise level the caller passes."}
    )
    num_train_timesteps: int = field(default=1000, metadata={"help": "Timesteps of the diffusion schedule."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra fully trained modules."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    init_weights: bool = field(default=True, metadata={"help": "Zero-initialise B (start equal to the base)."})

    # Read by peft's injection code; NaRA adapts modules, never bare parameters.
    target_parameters = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = NARA_PEFT_TYPE
        self.hidden_dims = tuple(int(d) for d in self.hidden_dims)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"Invalid NaRAConfig: {msg}")

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise bad(f"r must be an integer >= 1, got {self.r!r}.")
        if self.core not in CORES:
            raise bad(f"unknown core {self.core!r}; use one of {CORES}.")
        if self.embedding not in EMBEDDINGS:
            raise bad(f"unknown embedding {self.embedding!r}; use one of {EMBEDDINGS}.")
        if self.noise_input not in NOISE_INPUTS:
            raise bad(f"unknown noise_input {self.noise_input!r}; use one of {NOISE_INPUTS}.")
        if not self.core_scale >= 0:
            raise bad(f"core_scale must be >= 0, got {self.core_scale!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise bad(f"lora_alpha must be > 0 or None, got {self.lora_alpha!r}.")
        if self.embedding in ("fourier", "mlp") and (self.embedding_dim < 1):
            raise bad(f"embedding_dim must be >= 1, got {self.embedding_dim!r}.")
        if self.embedding == "fourier" and self.embedding_dim % 2:
            raise bad(f"embedding_dim must be even for the fourier embedding, got {self.embedding_dim}.")
        if any(d < 1 for d in self.hidden_dims):
            raise bad(f"hidden_dims must be positive, got {self.hidden_dims}.")
        if self.num_train_timesteps < 1:
            raise bad(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps!r}.")

    @property
    def effective_scaling(self) -> float:
        """The multiplier s of the low-rank branch, after the optional alpha/r factor."""
        if self.lora_alpha is None:
            return float(self.scaling)
        return float(self.scaling) * float(self.lora_alpha) / self.r

    @property
    def needs_noise_level(self) -> bool:
        """Whether a forward pass must be given a noise level (only the ``"noise"`` core reads it)."""
        return self.core == "noise"
