"""The analyses: one module per analysis, each registered by name (see ``headscope.registry``)."""

from headscope.analyses import summary

__all__ = ["summary"]
