"""Atomic, checksummed checkpoints: written to a temporary folder, renamed into place only when complete.

Layout of `run_dir/checkpoints/step-NNNNNNNN/` (meta.json `format: full`, the default):
  model.safetensors   trainable model weights (the denoiser's state_dict)
  ema.safetensors     EMA weights (when EMA is on)
  state.pt            optimizer, LR scheduler, sampler position, RNG states, step and counters (plain data:
                      read back with `weights_only=True`, see safe.py)
  meta.json           step, format, file list and a checksum per file (integrity.py), written last
Multi-process runs may write `format: sharded` instead (`dcp/` + `state.pt`, see distributed.py);
`load_checkpoint` returns whole (consolidated) model and EMA tensors for both.

Every change of the folder set is a rename, atomic on POSIX file systems, so at every moment each step has
one complete checkpoint: a folder named `step-*` that has meta.json, or, for an instant, a `.old-step-*`
folder that `cleanup_partial` puts back.
- save: files and meta.json (last) go into `.tmp-step-N-<pid>`, which is renamed to `step-N`; re-saving a
  step renames the existing folder to `.old-step-N-<pid>` first and deletes it after the new one is in place;
- prune: a folder is renamed to `.del-step-N-<pid>` before it is deleted.
A kill at any moment leaves at most such dot-folders besides the complete ones; `list_checkpoints` ignores
them and `cleanup_partial` (run at resume) removes them, restoring an `.old-` folder whose step has no other.
`resolve_checkpoint("latest")` verifies the newest checkpoint's checksums and falls back to the previous
valid one with a warning naming the damaged file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from frameloom.checkpoint.integrity import META, file_checksums, read_meta_json, verify_checkpoint
from frameloom.checkpoint.safe import UnsafeCheckpointError, load_state_file
from frameloom.errors import FrameloomError

STEP_RE = re.compile(r"^step-(\d{8})$")
# Dot-folders of an unfinished save (.tmp-), replacement (.old-) or deletion (.del-): never read as checkpoints.
TMP, OLD, DEL = ".tmp-", ".old-", ".del-"
_LEFTOVER_RE = re.compile(r"^\.(tmp|old|del)-(step-\d{8})-")

log = logging.getLogger("frameloom.checkpoint")


class CheckpointError(FrameloomError):
    """A checkpoint that is missing, damaged or unreadable."""


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


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder bottom-up (their entries are on disk too)."""
    dirs = [folder]
    for path in folder.rglob("*"):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for d in reversed(dirs):
        _fsync_dir(d)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def new_tmp(root: Path, step: int) -> Path:
    """An empty temporary folder for the checkpoint of `step` (a stale one of the same name is removed)."""
    tmp = root / f"{TMP}{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path, meta: dict[str, Any], checksums: dict[str, Any] | None = None) -> Path:
    """Complete the checkpoint written into `tmp` and rename it to `final`.

    meta.json (with `checksums` of every file, computed here unless given) is written last, everything is
    fsynced, then `tmp` is renamed to `final`. An existing `final` (the same step saved again, e.g. SIGTERM
    right after a periodic save, or a step re-trained after a fallback) is renamed away first and deleted
    only once the new folder is in place (see the module docstring)."""
    meta = dict(meta, checksums=file_checksums(tmp) if checksums is None else checksums)
    (tmp / META).write_text(json.dumps(meta))
    _fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f"{OLD}{final.name}-{os.getpid()}"
        if old.exists():  # left by an earlier process of this pid: stale, `final` is complete
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    tmp = new_tmp(root, step)
    files = ["model.safetensors", "state.pt"]
    save_file(_contiguous(model), tmp / "model.safetensors")
    if ema is not None:
        save_file(_contiguous(ema), tmp / "ema.safetensors")
        files.append("ema.safetensors")
    torch.save(state, tmp / "state.pt")
    return publish(tmp, root / step_name(step), {"step": step, "files": files})


def _step_folders(run_dir: str | Path) -> list[Path]:
    """Every `step-*` folder, complete or not, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a `step-*` folder with meta.json), oldest first. Not verified."""
    return [p for p in _step_folders(run_dir) if (p / META).exists()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (not verified; `resolve_checkpoint(run_dir, "latest")` verifies)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def cleanup_partial(run_dir: str | Path) -> list[Path]:
    """Remove what a killed save, replacement or prune left (`.tmp-`, `.old-`, `.del-` folders); an `.old-`
    folder whose step has no `step-*` folder is renamed back instead (a replacement killed between its two
    renames). Returns what was removed."""
    root = checkpoint_dir(run_dir)
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            match = _LEFTOVER_RE.match(p.name)
            if not match and not p.name.startswith(TMP):
                continue
            final = root / match.group(2) if match else None
            if match and match.group(1) == "old" and not final.exists():
                os.rename(p, final)
                log.warning("restored %s from %s (a replacement was interrupted)", final.name, p.name)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        _fsync_dir(root)
    return removed


def _remove_checkpoint(path: Path) -> None:
    """Delete a step folder: renamed to `.del-*` first, so it never exists half-deleted under its name."""
    doomed = path.parent / f"{DEL}{path.name}-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep_last: int, *, verified: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all), never the newest valid one:
    `verified` (a checkpoint just written and checksummed) or else the newest that passes verification."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    if verified is not None:
        keep.add(Path(verified))
    else:
        good = next((p for p in reversed(found) if verify_checkpoint(p).ok), None)
        if good is not None:
            keep.add(good)
    removed = [p for p in found if p not in keep]
    for p in removed:
        _remove_checkpoint(p)
    if removed:
        _fsync_dir(checkpoint_dir(run_dir))
    return removed


def resume_candidates(run_dir: str | Path, which: str | None) -> list[Path]:
    """The folders `which` may resume from, in the order to try them: none for None; for `latest` every
    `step-*` folder newest first (complete or not: verification rejects, with a warning, the ones that are
    not); else the one folder named (which must exist)."""
    if which is None:
        return []
    if which == "latest":
        return list(reversed(_step_folders(run_dir)))
    path = Path(which)
    if not (path / META).exists():
        raise CheckpointError(f"not a complete checkpoint folder: {path}")
    return [path]


def first_valid(
    run_dir: str | Path, which: str | None, check: Callable[[Path], list[str]], *, warn: bool = True
) -> Path | None:
    """The first of `resume_candidates(run_dir, which)` for which `check(folder)` finds no problem.

    A folder with problems is skipped with a warning naming them (if `warn`; for `latest`: a folder named
    explicitly must pass). None when there is no candidate; `CheckpointError` when there are some and none
    passes."""
    rejected = []
    for path in resume_candidates(run_dir, which):
        problems = check(path)
        if not problems:
            return path
        if which != "latest":
            raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
        if warn:
            log.warning(
                "checkpoint %s is damaged (%s); falling back to the previous valid checkpoint",
                path,
                "; ".join(problems),
            )
        rejected.append(f"{path.name}: {problems[0]}")
    if rejected:
        raise CheckpointError(f"no valid checkpoint in {checkpoint_dir(run_dir)} ({'; '.join(rejected)})")
    return None


def resolve_checkpoint(run_dir: str | Path, which: str | None) -> Path | None:
    """`None` -> None; `latest` -> the newest checkpoint whose files match their checksums (damaged newer
    ones are skipped with a warning naming the bad file; None if there is no checkpoint; an error if every
    one is damaged); else the named folder, which must be complete and undamaged."""
    return first_valid(run_dir, which, lambda path: verify_checkpoint(path).problems)


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json (`step`, `files`, `format`: `full` when absent)."""
    path = Path(path)
    try:
        meta = read_meta_json(path)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    meta.setdefault("format", "full")
    return meta


def load_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's `state.pt`, plain data only (`weights_only=True`); never runs code from the file."""
    path = Path(path)
    try:
        state = load_state_file(path / "state.pt")
    except (OSError, RuntimeError, UnsafeCheckpointError) as exc:
        raise CheckpointError(f"cannot read {path / 'state.pt'}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read {path / 'state.pt'}: not a dict")
    return state


def _load_sharded_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor] | None:
    """Whole tensors of one top-level entry (`model`, `ema`) of a torch.distributed.checkpoint folder, read
    in this process alone (DCP assembles each tensor from the shards of every rank that wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from frameloom.checkpoint.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

    reader = SafeFileSystemReader(str(folder))
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
        dcp.load(out, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
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
            "state": load_state(path),
            "step": int(meta["step"]),
        }
    except (OSError, KeyError, ValueError, RuntimeError, UnsafeCheckpointError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


# ---------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """Every global RNG a training step may touch: Python, NumPy, torch CPU and CUDA, as plain data (tuples,
    lists, numbers, tensors) that `torch.load(weights_only=True)` reads back."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
