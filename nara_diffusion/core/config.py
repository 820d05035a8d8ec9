"""`NaRAConfig`: the peft-style configuration of a NaRA adapter."""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .folders import ADAPTER_WEIGHTS_NAME

#: The peft type string under which NaRA is registered (see `core/tuner.py`).
NARA_PEFT_TYPE = "NARA"

CORES = ("noise", "constant", "identity")
EMBEDDINGS = ("fourier", "mlp", "raw")
NOISE_INPUTS = ("noise_level", "timestep")
#: Former values of ``noise_input``, accepted (and renamed) so that adapter folders saved before still load.
_OLD_NOISE_INPUTS = {"mask_ratio": "noise_level"}
#: Bound on the magnitude of core_scale, scaling, lora_alpha and fourier_scale. Larger values are never meaningful
#: multipliers and overflow half precision (65504), where ``inf · 0`` turns the zero-initialised branch into NaN.
MAX_MAGNITUDE = 1e4


def file_sha256(path: Union[str, Path]) -> str:
    """Hex SHA-256 of a file's bytes (the integrity check of ``adapter_model.safetensors``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            May be empty: F is then one linear map from the embedding to the r² core entries (still zero at start,
            still a function of λ through the embedding) — the smallest hypernetwork, a deliberate choice.
        core: ``"noise"`` (NaRA), ``"constant"`` (NaRA-C: a learned r × r core with no noise input) or
            ``"identity"`` (C = I, i.e. plain LoRA through the same code).
        noise_input: What callers pass as the noise level: ``"noise_level"`` (λ ∈ [0, 1] itself: a mask ratio for
            text, a mapped timestep for images) or ``"timestep"`` (a diffusion timestep t ∈ [0, num_train_timesteps],
            converted to λ = t / num_train_timesteps). The former name ``"mask_ratio"`` is read as ``"noise_level"``.
        num_train_timesteps: Number of diffusion training timesteps, used when ``noise_input="timestep"``.
        modules_to_save: Extra modules (by name) to train fully and save with the adapter.
        layers_to_transform: Only adapt these layer indices (peft semantics).
        layers_pattern: Name of the layer list used with ``layers_to_transform`` (peft semantics).
        init_weights: ``True`` initialises B to zero (the adapted model starts equal to the base model); ``False``
            initialises B like A, for tests and debugging.
        weights_sha256: Written by ``save_pretrained``: the SHA-256 of the ``adapter_model.safetensors`` saved beside
            the config, checked by ``nd.load_nara_model`` (a damaged or swapped weights file is refused instead of
            loading other numbers). ``None`` (older folders, or a config saved on its own) skips the check.

    Every field is validated on construction: a wrong type, a non-finite number or a value out of range raises
    ``ValueError`` naming the field and what it accepts. The multipliers (``core_scale``, ``scaling``, ``lora_alpha``,
    ``fourier_scale``) must lie within ±`MAX_MAGNITUDE` (1e4).
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
    noise_input: Literal["noise_level", "timestep"] = field(
        default="noise_level", metadata={"help": "Kind of noise level the caller passes."}
    )
    num_train_timesteps: int = field(default=1000, metadata={"help": "Timesteps of the diffusion schedule."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra fully trained modules."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    init_weights: bool = field(default=True, metadata={"help": "Zero-initialise B (start equal to the base)."})
    weights_sha256: Optional[str] = field(
        default=None, metadata={"help": "SHA-256 of the saved weights file (written by save_pretrained)."}
    )

    # Read by peft's injection code; NaRA adapts modules, never bare parameters.
    target_parameters = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = NARA_PEFT_TYPE
        if isinstance(self.noise_input, str):
            self.noise_input = _OLD_NOISE_INPUTS.get(self.noise_input, self.noise_input)
        self._validate()
        self.hidden_dims = tuple(int(d) for d in self.hidden_dims)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)

    def _validate(self) -> None:
        """Check every field's type and range (see the class docstring); raise ``ValueError`` naming the field."""

        def bad(name: str, accepts: str) -> ValueError:
            return ValueError(f"Invalid NaRAConfig: {name} must be {accepts}, got {getattr(self, name)!r}.")

        def integer(value: Any) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def real(value: Any) -> bool:
            return (
                isinstance(value, numbers.Real)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and abs(value) <= MAX_MAGNITUDE
            )

        def names(value: Any, allow_str: bool = True) -> bool:
            if value is None or (allow_str and isinstance(value, str)):
                return True
            return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value)

        if not integer(self.r) or self.r < 1:
            raise bad("r", "an integer >= 1")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            if not names(getattr(self, name)):
                raise bad(name, "None, a string, or a list of non-empty strings")
        # peft matches a string target_modules / exclude_modules as a regex, and layers_pattern inside one
        regexes = [("target_modules", self.target_modules), ("exclude_modules", self.exclude_modules)]
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []
        regexes += [("layers_pattern", rf".*\.{p}\.(\d+)\.") for p in patterns]
        for name, pattern in regexes:
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise bad(name, f"a valid regular expression ({err})") from err
        if not names(self.modules_to_save, allow_str=False):
            raise bad("modules_to_save", "None or a list of non-empty module names")
        layers = self.layers_to_transform
        if layers is not None and not (
            (integer(layers) and layers >= 0)
            or (isinstance(layers, (list, tuple)) and all(integer(i) and i >= 0 for i in layers))
        ):
            raise bad("layers_to_transform", "None, a layer index >= 0, or a list of them")
        if self.core not in CORES:
            raise ValueError(f"Invalid NaRAConfig: unknown core {self.core!r}; use one of {CORES}.")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"Invalid NaRAConfig: unknown embedding {self.embedding!r}; use one of {EMBEDDINGS}.")
        if self.noise_input not in NOISE_INPUTS:
            raise ValueError(
                f"Invalid NaRAConfig: unknown noise_input {self.noise_input!r}; use one of {NOISE_INPUTS}."
            )
        if not real(self.core_scale) or self.core_scale < 0:
            raise bad("core_scale", f"a number in [0, {MAX_MAGNITUDE:g}]")
        if not real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a number in [0, 1)")
        if not real(self.scaling):
            raise bad("scaling", f"a number in [-{MAX_MAGNITUDE:g}, {MAX_MAGNITUDE:g}]")
        if self.lora_alpha is not None and (not real(self.lora_alpha) or self.lora_alpha <= 0):
            raise bad("lora_alpha", f"None or a number in (0, {MAX_MAGNITUDE:g}]")
        if not math.isfinite(self.effective_scaling) or abs(self.effective_scaling) > MAX_MAGNITUDE:
            raise bad("lora_alpha", f"such that s = scaling · lora_alpha / r is within ±{MAX_MAGNITUDE:g}")
        if not integer(self.embedding_dim) or self.embedding_dim < 1:
            raise bad("embedding_dim", "an integer >= 1")
        if self.embedding == "fourier" and self.embedding_dim % 2:
            raise bad("embedding_dim", "even for the fourier embedding (sin and cos halves)")
        if not real(self.fourier_scale) or self.fourier_scale <= 0:
            raise bad("fourier_scale", f"a number in (0, {MAX_MAGNITUDE:g}] (the std of the Fourier frequencies)")
        dims = self.hidden_dims
        if not isinstance(dims, (list, tuple)) or not all(integer(d) and d >= 1 for d in dims):
            raise bad("hidden_dims", "a list of integers >= 1 (empty: one linear layer)")
        if not integer(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise bad("num_train_timesteps", "an integer >= 1")
        for name in ("init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "None or a string")
        digest = self.weights_sha256
        if digest is not None and not (
            isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
        ):
            raise bad("weights_sha256", "None or 64 lowercase hex digits")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json``, recording the SHA-256 of the ``adapter_model.safetensors`` beside it (peft
        writes the weights first), so that loading can refuse a damaged or swapped weights file."""
        weights = Path(save_directory) / ADAPTER_WEIGHTS_NAME
        previous = self.weights_sha256
        self.weights_sha256 = file_sha256(weights) if weights.is_file() else None
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.weights_sha256 = previous

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
