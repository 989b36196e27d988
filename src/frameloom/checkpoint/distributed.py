"""Training checkpoints from any number of processes, resumable under any other number.

Two layouts of `checkpoints/step-NNNNNNNN/` (meta.json `format`):

- `full`: `model.safetensors`, `ema.safetensors` (whole tensors, gathered on rank 0) and `state.pt`
  (optimizer state keyed by parameter name, scheduler, sampler, RNG, counters). One process writes it.
  A LoRA run's model tensors are its trainable ones only (`meta.json` `trainable_only`,
  checkpoint/trainable.py): the frozen base is rebuilt from `model.pretrained` when loading.
- `sharded`: `dcp/` written by every rank with torch.distributed.checkpoint (each rank its own shards of the
  model, optimizer and EMA; replicated tensors once), and `state.pt` (the non-tensor state) from rank 0.
  With `async_save` the tensors are staged to CPU memory and written by a background thread while training
  goes on; the checkpoint is completed (meta.json, rename) once the write has finished.

Both keep the atomic rule of io.py: everything goes into a `.tmp-*` folder, `meta.json` is written last, and
the folder is renamed to `step-*` (by rank 0, after every rank's data is on disk). Loading goes through
`torch.distributed.checkpoint.state_dict` (`get_/set_*_state_dict`), which names optimizer state by
parameter name and converts between full and sharded tensors, so a checkpoint from N processes, DDP or FSDP,
resumes under M processes, DDP or FSDP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from frameloom.checkpoint.io import (
    CheckpointError,
    _fsync_dir,
    capture_rng,
    checkpoint_dir,
    read_meta,
    step_name,
)
from frameloom.checkpoint.trainable import check_loaded, trainable_only
from frameloom.parallel.env import all_gather_objects, barrier, broadcast_object, is_distributed

FULL, SHARDED = "full", "sharded"
DCP_DIR = "dcp"

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _fsync_files(folder: Path, names: list[str]) -> None:
    for name in names:
        with open(folder / name, "rb") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it "assumes the intent is to save/load in a single process" without a process group:
    here that is the intent (checkpoint.format=sharded with one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


class PendingSave:
    """A checkpoint whose tensors are still being written (async); `finish()` completes it atomically."""

    def __init__(self, future: Future | None, tmp: Path, final: Path, meta: dict[str, Any]):
        self.future, self.tmp, self.final, self.meta = future, tmp, final, meta
        self.done = False

    def ready(self) -> bool:
        """True once this rank's part is written (rank 0's part includes the global metadata)."""
        return self.future is None or self.future.done()

    def finish(self) -> Path:
        """Wait for the write, then (rank 0) write meta.json and rename the folder into place. Idempotent."""
        if self.done:
            return self.final
        if self.future is not None:
            self.future.result()
        if _rank() == 0:
            _complete(self.tmp, self.final, self.meta)
        self.done = True
        return self.final


def _complete(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """meta.json last, fsync, atomic rename (a folder named step-* is always complete)."""
    (tmp / "meta.json").write_text(json.dumps(meta))
    _fsync_files(tmp, ["meta.json", *[f for f in meta["files"] if (tmp / f).is_file()]])
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    fmt: str = FULL,
    async_save: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> PendingSave:
    """Write the checkpoint of `step` (collective: every rank calls it). Returns a `PendingSave`; in the
    synchronous case it is already finished. `state` is the non-tensor state (scheduler, sampler, counters);
    the RNG states of every rank are added to it. `process_group` carries the async writer's collectives
    (a separate gloo group, so they never interleave with training's)."""
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    tmp = root / broadcast_object(f".tmp-{step_name(step)}-{os.getpid()}")  # one name, chosen by rank 0
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    rngs = all_gather_objects(capture_rng())  # one per rank, restored by rank on a same-size resume
    state = dict(state, rng=rngs, world_size=len(rngs))
    # A LoRA run saves what it trains (checkpoint/trainable.py): the frozen base comes from model.pretrained.
    only = trainable_only(module)
    meta: dict[str, Any] = {"step": step, "format": fmt, "trainable_only": only}
    future = None
    if fmt == FULL:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=only)
        model_sd = get_model_state_dict(module, options=full)  # whole tensors on rank 0 (collective)
        optim_sd = get_optimizer_state_dict(module, optimizer, options=_FULL)
        ema_sd = {k: _full_tensor(v).detach().cpu().contiguous() for k, v in ema.items()} if ema else None
        files = ["model.safetensors", "state.pt"] + (["ema.safetensors"] if ema_sd is not None else [])
        if _rank() == 0:
            save_file({k: v.contiguous() for k, v in model_sd.items()}, tmp / "model.safetensors")
            if ema_sd is not None:
                save_file(ema_sd, tmp / "ema.safetensors")
            torch.save(dict(state, optimizer=optim_sd), tmp / "state.pt")
    elif fmt == SHARDED:
        tensors = {
            "model": get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=only)),
            "optim": get_optimizer_state_dict(module, optimizer),
        }
        if ema:
            tensors["ema"] = ema
        files = [DCP_DIR, "state.pt"]
        meta["ema"] = bool(ema)
        if _rank() == 0:
            torch.save(state, tmp / "state.pt")
        if async_save:
            future = dcp.async_save(tensors, checkpoint_id=tmp / DCP_DIR, process_group=process_group)
        else:
            with _single_process_quiet():
                dcp.save(tensors, checkpoint_id=tmp / DCP_DIR, no_dist=not is_distributed())
    else:
        raise CheckpointError(f"checkpoint.format must be auto, full or sharded, not {fmt!r}")
    meta["files"] = files
    pending = PendingSave(future, tmp, final, meta)
    if future is None:
        barrier()  # every rank's files are written
        pending.finish()
        barrier()  # the folder is in place before anyone looks for it
    return pending


def _load_ema(ema: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    missing = set(ema) - set(full)
    if missing:
        raise CheckpointError(f"EMA state lacks {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, shadow in ema.items():
            value = full[name].to(shadow.dtype)
            if isinstance(shadow, DTensor):  # this rank's shard of the whole tensor (no communication)
                value = distribute_tensor(value, shadow.device_mesh, shadow.placements, src_data_rank=None)
            shadow.copy_(value)


def load_training_checkpoint(
    path: str | Path,
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """Load a checkpoint of either layout into this run's (possibly sharded) model, optimizer and EMA, in
    place; returns the non-tensor state (scheduler, sampler, counters, `rng`: this rank's RNG state or None)."""
    path = Path(path)
    meta = read_meta(path)
    try:
        state = torch.load(path / "state.pt", weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {path / 'state.pt'}: {exc}") from None
    only = bool(meta.get("trainable_only", False))  # the frozen base is not in it: rebuilt from pretrained
    if meta.get("format", FULL) == SHARDED:
        model_sd = get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=only))
        optim_sd = get_optimizer_state_dict(module, optimizer)  # initialises the optimizer state to load into
        tensors: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if ema is not None and meta.get("ema"):
            tensors["ema"] = ema  # loaded in place (local shards for DTensors)
        with _single_process_quiet():
            dcp.load(tensors, checkpoint_id=path / DCP_DIR, no_dist=not is_distributed())
        loaded = set_model_state_dict(module, model_sd, options=StateDictOptions(strict=not only))
        check_loaded(module, loaded.missing_keys, loaded.unexpected_keys, str(path))
        set_optimizer_state_dict(module, optimizer, optim_sd)
    else:
        full = StateDictOptions(full_state_dict=True, strict=not only)
        loaded = set_model_state_dict(module, load_file(path / "model.safetensors"), options=full)
        check_loaded(module, loaded.missing_keys, loaded.unexpected_keys, str(path))
        optim_sd = state.pop("optimizer")
        if optim_sd["state"] and all(isinstance(k, int) for k in optim_sd["state"]):
            if is_distributed():
                raise CheckpointError(f"{path} is from an older frameloom; resume it with one process first")
            optimizer.load_state_dict(optim_sd)  # written by optimizer.state_dict() (ids, one process)
        else:
            set_optimizer_state_dict(module, optimizer, optim_sd, options=full)
        ema_file = path / "ema.safetensors"
        if ema is not None and ema_file.exists():
            _load_ema(ema, load_file(ema_file))
    rngs = state.get("rng")
    if isinstance(rngs, list):  # one per rank of the saving run; a rank beyond them has none to restore
        state["rng"] = rngs[_rank()] if _rank() < len(rngs) else None
    return state
