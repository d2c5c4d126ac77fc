"""One process of a ``torchrun`` run for ``test_distributed.py``: checks the ``headscope.distributed`` helpers
against the other processes, then runs ``python -m headscope ARGS...`` exactly as ``torchrun -m headscope`` does.

    torchrun --nproc-per-node 2 tests/distributed_worker.py analyze MODEL ...

A failed check raises, so the process, and torchrun, exit non-zero.
"""

from __future__ import annotations

import runpy
import sys

import torch

from headscope import distributed
from headscope.analyses.sink_reducers import KeyReceived
from headscope.capture.reducers import ArgmaxKey, Reducer


def check_split_and_gather(rank: int, world: int) -> None:
    mine = distributed.split(list(range(7)))
    assert list(mine) == list(range(rank, 7, world)), mine
    assert distributed.gathered([10 * i for i in mine]) == [10 * i for i in range(7)]
    assert distributed.split(torch.arange(5)).tolist() == list(range(rank, 5, world))
    assert distributed.gather_objects(rank) == list(range(world))
    assert distributed.on_main(lambda: {"from": rank}) == {"from": 0}


def check_all_reduce(rank: int, world: int) -> None:
    """Sums and counts add over processes: a stack only some processes saw, a process that saw nothing, and
    per-position rows of different widths."""
    def full(shape: tuple[int, int], value: float) -> torch.Tensor:
        return torch.full(shape, value, dtype=torch.float64)

    plain = Reducer()
    if rank == 0:
        plain.sums, plain.counts = {"self": full((2, 3), 1.0)}, {"self": full((2, 3), 2.0)}
    elif rank == 1:  # later ranks saw nothing
        plain.sums = {"self": full((2, 3), 3.0), "cross": full((1, 2), 1.0)}
        plain.counts = {"self": full((2, 3), 1.0), "cross": full((1, 2), 1.0)}
    received = KeyReceived()
    width = 3 + 2 * rank
    received.sums[("self", 0)] = torch.arange(width, dtype=torch.float64)[None]
    received.counts[("self", 0)] = torch.ones(1, width, dtype=torch.float64)
    distributed.all_reduce_reducers([plain, received])
    assert torch.equal(plain.sums["self"], torch.full((2, 3), 4.0, dtype=torch.float64)), plain.sums
    assert torch.equal(plain.counts["self"], torch.full((2, 3), 3.0, dtype=torch.float64)), plain.counts
    assert torch.equal(plain.sums["cross"], torch.ones(1, 2, dtype=torch.float64)), plain.sums
    widest = 3 + 2 * (world - 1)
    expected = sum(torch.nn.functional.pad(torch.arange(3 + 2 * r, dtype=torch.float64), (0, widest - 3 - 2 * r))
                   for r in range(world))
    assert torch.equal(received.sums[("self", 0)][0], expected), received.sums
    assert received.counts[("self", 0)][0].tolist() == [world] * 3 + [world - 1] * 2 + [1] * (widest - 5)
    try:
        distributed.all_reduce_reducers([ArgmaxKey()])
    except TypeError:
        pass
    else:
        raise AssertionError("records (ArgmaxKey) must not be added")


def main() -> None:
    distributed.setup("cpu")
    assert distributed.active(), "run under torchrun with more than one process"
    rank, world = distributed.rank(), distributed.world_size()
    check_split_and_gather(rank, world)
    check_all_reduce(rank, world)
    sys.argv = ["headscope", *sys.argv[1:]]
    runpy.run_module("headscope", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
