"""Data-parallel runs under ``torchrun``: one process per device (or host), each on a share of the probe.

    torchrun --nproc-per-node 2 -m headscope analyze MODEL --analyses sinks,patterns

With ``WORLD_SIZE`` above 1 (set by ``torchrun``), :func:`setup` joins the process group (NCCL for CUDA
devices, gloo otherwise; torchrun's ``env://`` rendezvous), each analysis takes its share of the work with
:func:`split`, and the shares are put back together with :func:`all_reduce_reducers` (reducers' sums and
counts add exactly) or :func:`gathered` (per-example rows and tables, back in the order of a single-process
run). Every process ends with the same results; rank 0 alone writes them. Outside ``torchrun`` every function
here is the identity, and nothing is imported from ``torch.distributed``.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from headscope.capture.reducers import Recorder, Reducer
from headscope.errors import HeadscopeError

T = TypeVar("T")
# Reducers that keep records (argmax keys, rows, maps) rather than sums: gather them, do not add them.


def world_size() -> int:
    """The number of processes of the run: the process group's size, else torchrun's ``WORLD_SIZE``, else 1."""
    if _initialised():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    if _initialised():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes results, figures and the report (rank 0)."""
    return rank() == 0


def active() -> bool:
    """Whether several processes share the work (a process group of more than one is up)."""
    return _initialised() and torch.distributed.get_world_size() > 1


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def setup(device: str = "cpu") -> str:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; returns the device this process uses.

    The backend is NCCL when ``device`` is a CUDA device, gloo otherwise. ``cuda`` becomes ``cuda:LOCAL_RANK``,
    one GPU per process; an explicit ``cuda:N`` is kept. The group is left when the process exits.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if not torch.distributed.is_available():
        raise HeadscopeError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run one process")
    cuda = device.split(":")[0] == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise HeadscopeError(f"device '{device}' asked for, but no CUDA GPU is available: use --device cpu")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    if not _initialised():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_teardown)
    return device


def _teardown() -> None:
    if _initialised():
        torch.distributed.destroy_process_group()


def split(items: Sequence[T]) -> Sequence[T]:
    """This process's share of ``items``: every ``world_size()``-th item from its rank (strided, so that work
    whose cost grows along the list, such as ablations of later or earlier layers, spreads evenly).

    Works on anything that slices with a step: lists, ranges, tensors (along the first axis).
    """
    if world_size() <= 1:
        return items
    return items[rank()::world_size()]


def gathered(mine: Sequence[T]) -> list[T]:
    """Every process's :func:`split` share of results put back in the order of the original list.

    ``mine[k]`` is the result for item ``rank() + k * world_size()``. Tensors travel on the CPU.
    """
    if not active():
        return list(mine)
    shares = gather_objects(list(mine))
    out: list[T] = []
    for k in range(max(len(share) for share in shares)):
        out.extend(share[k] for share in shares if k < len(share))
    return out


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` in one process).

    Tensors inside (also in dicts, lists, tuples, dataclasses and reducers) are moved to the CPU first, so that
    no process receives tensors on another process's GPU.
    """
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, _on_cpu(obj))
    return out


def on_main(work: Callable[[], T]) -> T:
    """``work()`` run by rank 0 alone and its result handed to every process (for a result that later work
    depends on, such as an ordering of heads, which every process must agree on bit for bit)."""
    if not active():
        return work()
    found = [_on_cpu(work()) if is_main() else None]
    torch.distributed.broadcast_object_list(found, src=0)
    return found[0]


def all_reduce_reducers(reducers: Iterable[Reducer]) -> None:
    """Sum each reducer's sums and counts over every process, in place; afterwards every process holds the
    totals, as if one process had seen every example.

    Processes may hold different entries (a stack or layer one process never saw, a process with no examples
    at all) and, for :class:`~headscope.analyses.sink_reducers.KeyReceived`, different numbers of positions: missing
    entries count as zeros and the position axis widens to the longest. Everything travels as one float64
    buffer (on the current CUDA device under NCCL). Reducers that keep records rather than sums
    (``ArgmaxKey``, ``LastRow``, ``FullMaps``) cannot be added: gather them with :func:`gather_objects`.
    """
    reducers = list(reducers)
    if not active():
        return
    for reducer in reducers:
        if isinstance(reducer, Recorder):
            raise TypeError(f"{type(reducer).__name__} keeps records, not sums: gather it with gather_objects")
    layouts = gather_objects([{key: tuple(sums.shape) for key, sums in r.sums.items()} for r in reducers])
    device = torch.device("cuda", torch.cuda.current_device()) if _backend() == "nccl" else torch.device("cpu")
    places = []  # (store, key, shape every process agrees on)
    for index, reducer in enumerate(reducers):
        shapes: dict[Any, tuple[int, ...]] = {}
        for layout in layouts:
            for key, shape in layout[index].items():
                shapes[key] = _widest(shapes.get(key), shape, reducer, key)
        places += [(store, key, shapes[key]) for key in sorted(shapes, key=repr)
                   for store in (reducer.sums, reducer.counts)]
    if not places:
        return
    pieces = []
    for store, key, shape in places:
        padded = torch.zeros(shape, dtype=torch.float64, device=device)
        values = store.get(key)
        if values is not None:
            padded[tuple(slice(0, n) for n in values.shape)] = values.to(device, torch.float64)
        pieces.append(padded.flatten())
    buffer = torch.cat(pieces)
    torch.distributed.all_reduce(buffer)
    for (store, key, shape), total in zip(places, buffer.split([p.numel() for p in pieces]), strict=True):
        values = store.get(key)
        store[key] = total.view(shape).to(values.device if values is not None else "cpu",
                                          values.dtype if values is not None else torch.float64)


def _widest(known: tuple[int, ...] | None, shape: tuple[int, ...], reducer: Reducer, key: Any) -> tuple[int, ...]:
    """The shape that holds both: equal but for the last axis (positions), which widens."""
    if known is None:
        return shape
    if known[:-1] != shape[:-1]:
        raise ValueError(f"{type(reducer).__name__} holds {key} as {known} in one process and {shape} in another: "
                         "only the position axis may differ")
    return (*known[:-1], max(known[-1], shape[-1]))


def _backend() -> str:
    return str(torch.distributed.get_backend()).lower()


def _on_cpu(obj: Any) -> Any:
    """A copy of ``obj`` (tensors, dicts, lists, tuples, dataclasses, reducers) with its tensors on the CPU; other
    objects as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: _on_cpu(value) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_on_cpu(value) for value in obj)
    if isinstance(obj, Reducer) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        moved = copy.copy(obj)
        for name, value in vars(obj).items():
            object.__setattr__(moved, name, _on_cpu(value))  # frozen dataclasses too
        return moved
    return obj
