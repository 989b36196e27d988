"""Reading checkpoint files without unpickling arbitrary objects.

A pickle names the functions it calls while loading, so a tampered `state.pt` or `dcp/.metadata` could run any
code at resume. Everything a resume reads goes through this module instead:

- `state.pt` with `torch.load(weights_only=True)`: tensors, numbers, strings and plain containers only (the
  trainer keeps its non-tensor state in those types; RNG states included, see io.capture_rng);
- `dcp/.metadata` (torch.distributed.checkpoint's index, a pickle) with `MetadataUnpickler`, which resolves
  only the DCP metadata classes, `torch.Size`, dtypes, layouts and paths;
- `dcp/*.distcp`: tensors are read by DCP with `weights_only=True` already; the non-tensor entries
  ("bytes" items such as optimizer hyper-parameters) go through `SafeLoadPlanner`, which reads them with
  `weights_only=True` too (DCP's default planner uses `weights_only=False`).
The two DCP classes live in safe_dcp.py, so that reading a full checkpoint never imports
torch.distributed.checkpoint (seconds of start-up).

model/EMA weights are safetensors files (no code at all), meta.json is JSON.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from frameloom.errors import FrameloomError

# (module, name) pairs a DCP .metadata pickle may name (torch 2.4 - 2.13), besides torch dtypes.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(FrameloomError, pickle.UnpicklingError):
    """A checkpoint file names something other than plain data (possibly planted code); nothing was run."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file, refusing every global except its own data classes."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _DCP_METADATA_MODULE or (module, name) in _ALLOWED_GLOBALS:
            value = super().find_class(module, name)
            if isinstance(value, type) or (module, name) in _ALLOWED_GLOBALS:
                return value
        raise UnsafeCheckpointError(f"refusing to load {module}.{name} from a checkpoint's DCP metadata")


def load_state_file(path: str | Path) -> Any:
    """A `state.pt` read with `weights_only=True` (plain data only); planted objects raise
    `UnsafeCheckpointError` before anything runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(f"{path} holds more than plain data ({first})") from None
