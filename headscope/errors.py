"""Errors that reach users.

A :class:`HeadscopeError` carries one line that says what is wrong and what to do. The CLI prints that
line and exits with code 2; the Python API raises it as is.
"""

from __future__ import annotations


class HeadscopeError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class UnsupportedModelError(HeadscopeError):
    """The model's architecture cannot be captured by any path headscope has."""


class MemoryBudgetError(HeadscopeError):
    """A request would exceed the memory budget; the message gives the estimate and how to lower it."""


class NonFiniteError(RuntimeError):
    """Attention or a head's output held NaN or inf: the message names the layer and head.

    Not a user-input error: inside ``headscope analyze`` the analysis is recorded as failed and the others run.
    """
