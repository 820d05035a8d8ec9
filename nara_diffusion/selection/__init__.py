"""Which modules get an adapter: DiffoRA."""

from .diffora import DiffoRAResult, GatedAdapters, discretize, restrict_to, save_dam, search, select_with_diffora

__all__ = ["DiffoRAResult", "GatedAdapters", "discretize", "restrict_to", "save_dam", "search", "select_with_diffora"]
