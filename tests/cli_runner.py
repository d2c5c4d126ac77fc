"""Run the ``headscope`` command line in-process, as a user would from a shell."""

from __future__ import annotations

import sys

import pytest

from headscope.cli import main


def run_cli(*args: str) -> int:
    """``headscope ARGS...``; returns the exit code."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["headscope", *args])
        try:
            main()
        except SystemExit as done:
            return 0 if done.code is None else int(done.code)
    return 0
