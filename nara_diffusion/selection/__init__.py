"""Which modules get an adapter: DiffoRA."""

from .diffora import (
    DiffoRAResult,
    GatedAdapters,
    SelectionConfig,
    discretize,
    restrict_to,
    save_dam,
    search,
    select_before_training,
    select_with_diffora,
)

__all__ = [
    "DiffoRAResult",
    "GatedAdapters",
    "SelectionConfig",
    "discretize",
    "restrict_to",
    "save_dam",
    "search",
    "select_before_training",
    "select_with_diffora",
]
