"""Models larger than one device: accelerate's ``device_map``, read from what the user gives.

``load(..., device_map="auto")`` hands the map to ``from_pretrained``: accelerate places each block on a GPU,
on the CPU or on disk, and moves activations between them with hooks around each block's forward. headscope
needs nothing more: its attention function runs inside each attention module on that module's device, reducers
keep their sums on the device of the first layer they see and add the others' into it, and gate tables go to
the device of the head outputs z they act on.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headscope.errors import HeadscopeError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?|xpu(:\d+)?)$")
# Offload folders made for a load that named none; removed when the process exits.
_SCRATCH: list[tempfile.TemporaryDirectory] = []


def read_device_map(given: str | dict[str, Any] | Path) -> str | dict[str, Any]:
    """A device map from ``given``: a strategy name (``auto``...), a ``{module: device}`` dict, that dict as
    JSON text, or a ``.json`` file holding it. One clear error for anything else."""
    if isinstance(given, str) and given in STRATEGIES:
        return given
    if isinstance(given, (str, Path)) and not str(given).lstrip().startswith("{"):
        path = Path(given).expanduser()
        if path.suffix != ".json" or not path.is_file():
            raise HeadscopeError(f"--device-map takes {', '.join(STRATEGIES)}, a JSON object "
                                 f"{{\"module\": \"device\"}} or a .json file holding one; got {str(given)!r}")
        given = path.read_text(encoding="utf-8")
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except json.JSONDecodeError as error:
            raise HeadscopeError(f"--device-map is not valid JSON: {error.msg} at character {error.pos}") from None
    if not isinstance(given, dict) or not given:
        raise HeadscopeError("a device map is a non-empty JSON object {\"module name\": \"device\"}")
    for module, device in given.items():
        is_index = isinstance(device, int) and not isinstance(device, bool) and device >= 0
        if not (is_index or (isinstance(device, str) and _DEVICE.match(device))):
            raise HeadscopeError(f"device map entry {module!r}: {device!r} is not a device (cpu, disk, cuda:N or N)")
        if (isinstance(device, int) or str(device).startswith("cuda")) and not torch.cuda.is_available():
            raise HeadscopeError(f"device map entry {module!r} asks for {device!r}, but no CUDA GPU is available")
    return given


def placement_options(device_map: str | dict[str, Any] | None, offload_folder: str | Path | None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``device_map`` ({} without one): the map, and an offload folder
    where weights may go to disk (a temporary one unless given)."""
    if device_map is None:
        return {}
    device_map = read_device_map(device_map)
    options: dict[str, Any] = {"device_map": device_map}
    may_spill = isinstance(device_map, str) or "disk" in device_map.values()
    if offload_folder is not None:
        options["offload_folder"] = str(offload_folder)
    elif may_spill:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="headscope-offload-"))
        options["offload_folder"] = _SCRATCH[-1].name
    return options


def placed_on(model: nn.Module) -> str:
    """Where a dispatched model lives, in words: ``device_map: cpu, disk`` (its devices, in map order)."""
    devices = dict.fromkeys(str(device) for device in getattr(model, "hf_device_map", {}).values())
    return "device_map: " + ", ".join(devices or ["cpu"])
