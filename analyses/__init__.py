"""The analyses: one module per analysis, each registered by name (see ``headscope.registry``)."""

from headscope.analyses import eviction, importance, patching, patterns, retrieval, saliency, sinks, summary, vhd

__all__ = ["eviction", "importance", "patching", "patterns", "retrieval", "saliency", "sinks", "summary", "vhd"]
