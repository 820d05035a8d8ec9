"""DiffoRA: learn which modules deserve an adapter (a labelled reconstruction; see the README).

DiffoRA's paper gives the ingredients (a Differential Adaptation Matrix over layer × module candidates,
continuous relaxation, discretisation, weight sharing, bi-level optimisation) but its method section was never
obtained. This module implements the DARTS-style reading of them (spec lift_diffora_peers.md §A.4):

1. **Relax.** Every candidate module already carries an adapter (NaRA, NaRA-C or LoRA); its branch is scaled by
   a gate σ(α), one α per candidate (the DAM), applied by a forward hook on the adapter's B projection.
2. **Search.** A short first-order bi-level phase alternates one update of the adapter weights on a training
   batch and one update of α on a held-out batch.
3. **Discretise.** Keep the top ``sample_rate`` fraction of candidates by α, over all of them (``"global"``) or
   within each layer (``"per_layer"``); the others lose their adapter.
4. **Inherit.** The kept adapters keep their searched weights, bit for bit (weight sharing), and training goes on
   from there; the kept list becomes the adapter config's ``target_modules``, so the saved folder loads with
   nothing extra.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..training.config import option
from ..training.loop import LossFn

SCOPES = ("global", "per_layer")
_B_NAMES = ("nara_B", "lora_B")


@dataclass
class DiffoRAResult:
    """The outcome of a search: α per candidate (the DAM), the kept candidates and how they were chosen."""

    alphas: dict[str, float]
    kept: list[str]
    sample_rate: float
    scope: str
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "scope": self.scope,
            "alphas": self.alphas,
            "kept": self.kept,
            "history": self.history,
        }


def _tuner_prefix(model: nn.Module) -> str:
    """The prefix of the base model's modules inside ``model`` (``base_model.model.`` for a PeftModel)."""
    return "base_model.model." if hasattr(model, "peft_config") and hasattr(model, "base_model") else ""


def adapted_modules(model: nn.Module) -> dict[str, BaseTunerLayer]:
    """Adapter-carrying layers by their name in the base model (e.g. ``model.transformer.blocks.0.q_proj``)."""
    prefix = _tuner_prefix(model)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and any(hasattr(module, b) for b in _B_NAMES):
            out[name.removeprefix(prefix)] = module
    if not out:
        raise ValueError("The model has no adapter layers: attach NaRA or LoRA to the candidate modules first.")
    return out


def split_name(name: str) -> tuple[str, str]:
    """(layer, module) of a candidate: split after the last numbered block that leaves a module name
    (``blocks.3.q_proj`` → (``blocks.3``, ``q_proj``); ``transformer_blocks.0.attn1.to_out.0`` →
    (``transformer_blocks.0``, ``attn1.to_out.0``)); without one, (parent, last part)."""
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
    return ".".join(parts[:-1]), parts[-1]


class GatedAdapters:
    """σ(α) gates on every adapted layer of ``model`` (hooks on the adapter's B projection; removable).

    Args:
        model: A model carrying NaRA or LoRA adapters.
        init: Initial α (σ(0) = 0.5 scales every branch by a half, as DARTS starts from uniform weights).
    """

    def __init__(self, model: nn.Module, init: float = 0.0) -> None:
        self.modules = adapted_modules(model)
        self.names = list(self.modules)
        device = next(iter(self.modules.values())).get_base_layer().weight.device
        self.alpha = nn.Parameter(torch.full((len(self.names),), float(init), device=device))
        self._handles = []
        for i, module in enumerate(self.modules.values()):
            for b_name in _B_NAMES:
                for b in getattr(module, b_name, {}).values():
                    self._handles.append(b.register_forward_hook(self._gate(i)))

    def _gate(self, index: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * torch.sigmoid(self.alpha[index]).to(output.dtype)

        return hook

    def values(self) -> dict[str, float]:
        return dict(zip(self.names, self.alpha.detach().cpu().tolist(), strict=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _cycle(batches: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("A DiffoRA search needs data in both the training and the held-out loader.")


def search(
    model: nn.Module,
    train_batches: Iterable,
    heldout_batches: Iterable,
    loss_fn: LossFn,
    *,
    steps: int = 50,
    adapter_lr: float = 1e-4,
    alpha_lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    adapted: Optional[nn.Module] = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """First-order bi-level search: per step, one adapter update on a training batch, one α update on a held-out
    batch. Returns (α per candidate, loss history). The adapter weights are updated in place (they are inherited).

    ``adapted`` is the module whose adapters are the candidates (default ``model``; e.g. the UNet inside a training
    wrapper); candidate names are relative to it.
    """
    if heldout_batches is None:
        raise ValueError("A DiffoRA search needs held-out data for the α updates.")
    gates = GatedAdapters(model if adapted is None else adapted)
    weights = [p for p in model.parameters() if p.requires_grad]
    weight_opt = torch.optim.AdamW(weights, lr=adapter_lr, weight_decay=0.0)
    alpha_opt = torch.optim.Adam([gates.alpha], lr=alpha_lr, betas=(0.5, 0.999))
    train_iter, heldout_iter = _cycle(train_batches), _cycle(heldout_batches)
    history: list[dict[str, float]] = []
    device = gates.alpha.device
    try:
        from tqdm.auto import trange

        for step in trange(steps, desc="DiffoRA search", disable=not progress):
            model.train()
            gen = torch.Generator(device=device).manual_seed(seed * 7919 + 2 * step)
            train_loss = loss_fn(model, next(train_iter), gen)
            weight_opt.zero_grad(set_to_none=True)
            train_loss.backward()
            weight_opt.step()
            gates.alpha.grad = None

            gen = torch.Generator(device=device).manual_seed(seed * 7919 + 2 * step + 1)
            heldout_loss = loss_fn(model, next(heldout_iter), gen)
            alpha_opt.zero_grad(set_to_none=True)
            weight_opt.zero_grad(set_to_none=True)
            heldout_loss.backward()
            alpha_opt.step()
            weight_opt.zero_grad(set_to_none=True)
            history.append({"train_loss": train_loss.detach().item(), "heldout_loss": heldout_loss.detach().item()})
    finally:
        gates.remove()
    return gates.values(), history


def discretize(alphas: dict[str, float], sample_rate: float, scope: str = "global") -> list[str]:
    """Keep ⌈rate·N⌉ candidates with the largest α (``"global"``), or ⌈rate·M_l⌉ within each layer l
    (``"per_layer"``). Ties go to the earlier candidate. Returns the kept names in model order."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
    if scope not in SCOPES:
        raise ValueError(f"select_scope must be one of {SCOPES}, got {scope!r}.")
    names = list(alphas)
    groups: dict[str, list[str]] = {"": names}
    if scope == "per_layer":
        groups = {}
        for name in names:
            groups.setdefault(split_name(name)[0], []).append(name)
    kept: set[str] = set()
    for members in groups.values():
        count = math.ceil(sample_rate * len(members))
        ranked = sorted(members, key=lambda n: (-alphas[n], names.index(n)))
        kept.update(ranked[:count])
    return [n for n in names if n in kept]


def restrict_to(model: nn.Module, kept: list[str]) -> nn.Module:
    """Remove the adapters of every candidate not in ``kept`` (their base layers come back) and make ``kept`` the
    adapter config's ``target_modules``; the kept adapters are left untouched. Returns ``model``."""
    modules = adapted_modules(model)
    missing = sorted(set(kept) - set(modules))
    if missing:
        raise ValueError(f"Unknown candidates {missing[:5]}; kept names must come from the search.")
    prefix = _tuner_prefix(model)
    for name, module in modules.items():
        if name in kept:
            continue
        parent_name, _, child = (prefix + name).rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for config in getattr(model, "peft_config", {}).values():
        config.target_modules = list(kept)
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "targeted_module_names"):
        tuner.targeted_module_names = list(kept)
    return model


def save_dam(result: DiffoRAResult, folder: Path | str) -> tuple[Path, Optional[Path]]:
    """Write ``diffora.json`` (α, kept, history) and, when matplotlib is installed, ``diffora.png``: the DAM as a
    layers × modules heat map of σ(α) with the kept cells outlined. Returns the two paths (PNG may be None)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "diffora.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        return json_path, None
    layers, modules = [], []
    for name in result.alphas:
        layer, module = split_name(name)
        layers += [layer] if layer not in layers else []
        modules += [module] if module not in modules else []
    grid = torch.full((len(layers), len(modules)), float("nan"))
    for name, alpha in result.alphas.items():
        layer, module = split_name(name)
        grid[layers.index(layer), modules.index(module)] = torch.sigmoid(torch.tensor(alpha))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(modules), 1.0 + 0.35 * len(layers)))
    image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
    for name in result.kept:
        layer, module = split_name(name)
        ax.add_patch(
            Rectangle((modules.index(module) - 0.5, layers.index(layer) - 0.5), 1, 1, fill=False, lw=2, edgecolor="red")
        )
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_title(f"DiffoRA gates σ(α); kept (red): {len(result.kept)}/{len(result.alphas)}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    png_path = folder / "diffora.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path


def select_with_diffora(
    model: nn.Module,
    train_batches: Iterable,
    heldout_batches: Iterable,
    loss_fn: LossFn,
    *,
    sample_rate: float = 0.5,
    scope: str = "global",
    steps: int = 50,
    adapter_lr: float = 1e-4,
    alpha_lr: float = 3e-3,
    seed: int = 0,
    output_dir: Optional[Path | str] = None,
    adapted: Optional[nn.Module] = None,
    resume: bool = False,
) -> list[str]:
    """Search, discretise and restrict the adapters of ``adapted`` (default ``model``) in place; returns the kept list.

    Writes ``diffora.json`` / ``diffora.png`` to ``output_dir`` (main process only). Under data parallelism every
    process runs the same deterministic search and the main process's kept list is broadcast, so all agree. With
    ``resume`` and an existing ``output_dir/diffora.json``, the kept list is read back instead of searching again.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    discretize({"probe": 0.0}, sample_rate, scope)  # validate the options before the (long) search
    target = model if adapted is None else adapted
    dam = None if output_dir is None else Path(output_dir) / "diffora.json"
    if resume and dam is not None and dam.is_file():
        kept = json.loads(dam.read_text())["kept"]
        restrict_to(target, kept)
        return kept
    state = PartialState()
    alphas, history = search(
        model, train_batches, heldout_batches, loss_fn, steps=steps, adapter_lr=adapter_lr, alpha_lr=alpha_lr,
        seed=seed, progress=state.is_local_main_process, adapted=adapted,
    )  # fmt: skip
    kept = [discretize(alphas, sample_rate, scope)]
    if state.num_processes > 1:
        broadcast_object_list(kept)
    restrict_to(target, kept[0])
    if output_dir is not None and state.is_main_process:
        save_dam(DiffoRAResult(alphas, kept[0], sample_rate, scope, history), output_dir)
    return kept[0]


@dataclass
class SelectionConfig:
    """The DiffoRA fields of a training config (mixed into the LLaDA and DreamBooth configs).

    ``select="diffora"`` runs `select_before_training`; ``None`` adapts every target module.
    """

    select: Optional[str] = option(
        None,
        help="Learn which modules get an adapter before training (none: adapt every target).",
        choices=("diffora", None),
    )
    sample_rate: float = option(0.5, help="DiffoRA: share of the candidate modules kept, in (0, 1].")
    select_scope: str = option(
        "global", help="DiffoRA: rank modules over the model or within each layer.", choices=SCOPES
    )
    search_steps: int = option(50, help="DiffoRA: updates of the relaxed search.")
    search_holdout: float = option(0.2, help="DiffoRA: share of the training set held out to learn the gates α.")
    alpha_lr: float = option(3e-3, help="DiffoRA: learning rate of the gates α.")

    def check_selection(self) -> None:
        """Raise ValueError for an unknown ``select``, a ``sample_rate`` outside (0, 1], a bad scope or holdout."""
        if self.select not in (None, "diffora"):
            raise ValueError(f"select must be 'diffora' or none, got {self.select!r}.")
        if self.select:
            discretize({"probe": 0.0}, self.sample_rate, self.select_scope)  # validates both options
            if not 0 < self.search_holdout < 1:
                raise ValueError(f"search_holdout must be in (0, 1), got {self.search_holdout}.")


def select_before_training(
    model: nn.Module,
    dataset: Any,
    collate_fn: Callable,
    loss_fn: LossFn,
    config: Any,
    *,
    adapted: Optional[nn.Module] = None,
) -> list[str]:
    """`select_with_diffora` on a seeded held-out share (``config.search_holdout``) of ``dataset``.

    ``config`` is a training config with the `SelectionConfig` fields and ``seed``, ``batch_size``,
    ``learning_rate`` (the search's adapter learning rate), ``output_dir`` and ``resume``.
    """
    from torch.utils.data import DataLoader, Subset

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed)).tolist()
    cut = max(1, round(config.search_holdout * len(order)))
    if cut >= len(order):
        raise ValueError(f"DiffoRA needs data to train on and data held out for α: {len(order)} examples are too few.")
    train, heldout = (
        DataLoader(Subset(dataset, part), batch_size=config.batch_size, shuffle=False, collate_fn=collate_fn)
        for part in (order[cut:], order[:cut])
    )
    return select_with_diffora(
        model,
        train,
        heldout,
        loss_fn,
        sample_rate=config.sample_rate,
        scope=config.select_scope,
        steps=config.search_steps,
        adapter_lr=config.learning_rate,
        alpha_lr=config.alpha_lr,
        seed=config.seed,
        output_dir=config.output_dir,
        adapted=adapted,
        resume=config.resume,
    )
