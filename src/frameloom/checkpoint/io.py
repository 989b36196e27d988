"""Atomic checkpoints: written to a temporary folder, renamed into place only when complete.

Layout of `run_dir/checkpoints/step-NNNNNNNN/` (meta.json `format: full`, the default):
  model.safetensors   trainable model weights (the denoiser's state_dict)
  ema.safetensors     EMA weights (when EMA is on)
  state.pt            optimizer, LR scheduler, sampler position, RNG states, step and counters
  meta.json           step, format and file list, written last
Multi-process runs may write `format: sharded` instead (`dcp/` + `state.pt`, see distributed.py);
`load_checkpoint` returns whole (consolidated) model and EMA tensors for both.

A kill at any moment leaves either the previous complete checkpoint set or a `.tmp-step-*` folder, which
`latest_checkpoint` ignores and `cleanup_partial` removes. The rename of a folder is atomic on POSIX file
systems, so a folder named `step-*` is always complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from frameloom.errors import FrameloomError

STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(FrameloomError):
    """A checkpoint that is missing or unreadable."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    state: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` atomically and return its folder."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = ["model.safetensors", "state.pt"]
    save_file(_contiguous(model), tmp / "model.safetensors")
    if ema is not None:
        save_file(_contiguous(ema), tmp / "ema.safetensors")
        files.append("ema.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "files": files}))
    for name in [*files, "meta.json"]:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def cleanup_partial(run_dir: str | Path) -> list[Path]:
    """Remove `.tmp-*` folders left by a killed save; returns what was removed."""
    root = checkpoint_dir(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return []
    old = list_checkpoints(run_dir)[:-keep_last]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def resolve_checkpoint(run_dir: str | Path, which: str | None) -> Path | None:
    """`None` -> None; `latest` -> newest complete one (None if there is none); else a folder that must exist."""
    if which is None:
        return None
    if which == "latest":
        return latest_checkpoint(run_dir)
    path = Path(which)
    if not (path / "meta.json").exists():
        raise CheckpointError(f"not a complete checkpoint folder: {path}")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json (`step`, `files`, `format`: `full` when absent)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        int(meta["step"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    meta.setdefault("format", "full")
    return meta


def _load_sharded_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor] | None:
    """Whole tensors of one top-level entry (`model`, `ema`) of a torch.distributed.checkpoint folder, read
    in this process alone (DCP assembles each tensor from the shards of every rank that wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(folder))
    metadata = reader.read_metadata().state_dict_metadata
    head = prefix + "."
    out = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in metadata.items()
        if key.startswith(head) and isinstance(m, TensorStorageMetadata)
    }
    if not out:
        return None
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=reader, no_dist=True)
    return {key[len(head) :]: value for key, value in out.items()}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint folder: {'model': state_dict, 'ema': state_dict | None, 'state': dict, 'step': int}.

    Model and EMA come back whole, also from a sharded checkpoint (for `sample` and `export`); the optimizer
    of a sharded one stays on disk (resume reads it with `distributed.load_training_checkpoint`)."""
    path = Path(path)
    meta = read_meta(path)
    try:
        if meta["format"] == "sharded":
            model = _load_sharded_tensors(path / "dcp", "model")
            if model is None:
                raise KeyError("no model tensors in dcp/")
            ema = _load_sharded_tensors(path / "dcp", "ema")
        else:
            ema_file = path / "ema.safetensors"
            model = load_file(path / "model.safetensors")
            ema = load_file(ema_file) if ema_file.exists() else None
        return {
            "model": model,
            "ema": ema,
            "state": torch.load(path / "state.pt", weights_only=False),
            "step": int(meta["step"]),
        }
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


# ---------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """Every global RNG a training step may touch: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
