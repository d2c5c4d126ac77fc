"""The analyses: one module per analysis, each registered by name (see ``headscope.registry``)."""

from headscope.analyses import importance, patterns, sinks, summary

__all__ = ["importance", "patterns", "sinks", "summary"]
