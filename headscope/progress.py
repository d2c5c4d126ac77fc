"""Where long work is: each long step of an analysis reports its count done, out of how many, and an ETA.

An analysis wraps its long loops in :func:`steps`; whoever runs it chooses how that shows, with :func:`reporting`:
a rich progress bar in a terminal (``headscope analyze``), plain lines at most every few seconds where output is
not a terminal (a log, CI), tqdm bars in Jupyter (:func:`headscope.run`), or nothing (``-q``, and library calls
outside Jupyter).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")
PLAIN_EVERY_SECONDS = 10.0


class Reporter:
    """Shows steps; the base shows nothing."""

    def start(self, description: str, total: int | None) -> Any:
        return None

    def advance(self, task: Any, done: int) -> None:
        pass

    def finish(self, task: Any) -> None:
        pass

    def phase(self, message: str) -> None:
        """A stage of a run with no count (``loading model``, ``writing figures``)."""


class Plain(Reporter):
    """Plain lines for a log: one when a step's first item is done (with the time left at that rate), then at most
    one every ``every`` seconds, then one when the step ends; each with the count and the elapsed time. Nothing is
    said before an item is done, so bad input found at the start stays the run's one line; stages are not said."""

    def __init__(self, stream: IO[str] | None = None, every: float = PLAIN_EVERY_SECONDS) -> None:
        self.stream, self.every = stream, every

    def start(self, description: str, total: int | None) -> Any:
        return {"description": description, "total": total, "done": 0, "started": time.monotonic(), "said": None}

    def advance(self, task: Any, done: int) -> None:
        task["done"] = done
        if task["said"] is None or time.monotonic() - task["said"] >= self.every:
            self._say(task)

    def finish(self, task: Any) -> None:
        if task["said"] is not None:
            self._say(task, end=True)

    def _say(self, task: dict, end: bool = False) -> None:
        now = time.monotonic()
        task["said"] = now
        elapsed = now - task["started"]
        done, total = task["done"], task["total"]
        count = f"{done}/{total}" if total else f"{done}"
        line = f"headscope: {task['description']}: {count}, {_clock(elapsed)} elapsed"
        if end:
            line += ", done" if not total or done == total else ", stopped"
        elif total:
            line += f", about {_clock(elapsed / done * (total - done))} left"
        print(line, file=self.stream or sys.stderr, flush=True)


class Rich(Reporter):
    """A rich progress bar per step (count, elapsed, time left) on a terminal console."""

    def __init__(self, console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console,
                                 transient=False)
        self.status = None

    def __enter__(self) -> Rich:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, description: str, total: int | None) -> Any:
        return self.progress.add_task(description, total=total)

    def advance(self, task: Any, done: int) -> None:
        self.progress.update(task, completed=done)

    def finish(self, task: Any) -> None:
        self.progress.update(task, completed=self.progress.tasks[task].total or self.progress.tasks[task].completed)

    def phase(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/dim]", highlight=False)


class Notebook(Reporter):
    """tqdm bars (the notebook widget in Jupyter, text elsewhere)."""

    def start(self, description: str, total: int | None) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, leave=False)

    def advance(self, task: Any, done: int) -> None:
        task.update(done - task.n)

    def finish(self, task: Any) -> None:
        task.close()


_CURRENT: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("headscope_progress", default=None)
_SILENT = Reporter()


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Show the steps of the work done inside with ``reporter``."""
    token = _CURRENT.set(reporter)
    try:
        yield reporter
    finally:
        _CURRENT.reset(token)


def current() -> Reporter:
    """The reporter of the work being done: the one :func:`reporting` set, else one that shows nothing."""
    return _CURRENT.get() or _SILENT


def in_jupyter() -> bool:
    """Whether this runs in a Jupyter kernel."""
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def steps(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """``items``, each reported as one step of ``description`` done (of ``total``, default ``len(items)``)."""
    reporter = current()
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    task = reporter.start(description, total)
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            reporter.advance(task, done)
    finally:
        reporter.finish(task)


def phase(message: str) -> None:
    """Say which stage a run is at."""
    current().phase(message)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
