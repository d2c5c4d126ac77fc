"""``headscope`` in a process of its own that stops at a named point and waits there to be signalled.

``python paused_cli.py POINT ARGS...`` runs ``headscope ARGS...``. On reaching POINT it prints ``paused at POINT``
on stdout and sleeps until a signal ends or interrupts it:

- ``analysis:NAME``: inside analysis NAME, before it does any work (the analyses before it are saved);
- ``figures``: while the figures are written, after every analysis is saved;
- ``writing:N``: in the N-th write of ``results.json``, its new content whole in a temporary file that has not yet
  replaced the file (which holds the N - 1 analyses saved before).

A test reads that line and then sends its signal, so it knows where the process is when the signal lands: no timer
and no poll decide what was saved.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import NoReturn

from headscope import registry, runner
from headscope.cli import main


def pause(point: str) -> NoReturn:
    print(f"paused at {point}", flush=True)
    while True:
        time.sleep(3600)  # a signal's handler raises out of the sleep; SIGKILL ends the process here


def stop_at(point: str) -> None:
    where, _, name = point.partition(":")
    if where == "analysis":
        analysis = registry.get(name)

        @functools.wraps(analysis.run)  # keeps the module, whose Params the runner checks --set against
        def paused(context):
            pause(point)

        registry._REGISTRY[name] = dataclasses.replace(analysis, run=paused)
    elif where == "figures":
        runner.write_figures = lambda *args, **kwargs: pause(point)
    elif where == "writing":
        replace, writes = os.replace, []

        def paused_replace(source, target, *args, **kwargs):
            if os.path.basename(target) == "results.json":
                writes.append(target)
                if len(writes) == int(name):
                    pause(point)
            return replace(source, target, *args, **kwargs)

        os.replace = paused_replace
    else:
        raise SystemExit(f"unknown point {point!r}: analysis:NAME, figures or writing:N")


if __name__ == "__main__":
    stop_at(sys.argv[1])
    sys.argv = ["headscope", *sys.argv[2:]]
    main()
