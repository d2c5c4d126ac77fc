"""The analyses: one module per analysis, each registered by name (see ``headscope.registry``)."""

from headscope.analyses import patterns, sinks, summary

__all__ = ["patterns", "sinks", "summary"]
