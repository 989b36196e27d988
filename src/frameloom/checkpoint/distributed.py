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

Both keep the atomic rule of io.py: everything goes into a `.tmp-*` folder, `meta.json` (with a checksum of
every file, each process hashing a share of them) is written last, and the folder is renamed to `step-*` by
rank 0 after every rank's data is on disk (`io.publish`). `resume_training_checkpoint` verifies those checksums
(rank 0) before anything is read and falls back to the previous valid checkpoint, on every rank alike, when a
file is damaged or cannot be loaded; nothing it reads can run code (safe.py). Loading goes through
`torch.distributed.checkpoint.state_dict` (`get_/set_*_state_dict`), which names optimizer state by
parameter name and converts between full and sharded tensors, so a checkpoint from N processes, DDP or FSDP,
resumes under M processes, DDP or FSDP.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from frameloom.checkpoint.integrity import checkpoint_files, file_checksums, verify_checkpoint
from frameloom.checkpoint.io import (
    CheckpointError,
    capture_rng,
    checkpoint_dir,
    cleanup_partial,
    first_valid,
    load_state,
    new_tmp,
    publish,
    read_meta,
    step_name,
)
from frameloom.checkpoint.safe_dcp import SafeFileSystemReader, SafeLoadPlanner
from frameloom.checkpoint.trainable import check_loaded, trainable_only
from frameloom.parallel.env import all_gather_objects, barrier, broadcast_object, is_distributed

FULL, SHARDED = "full", "sharded"
DCP_DIR = "dcp"

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _world() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _shared_checksums(folder: Path) -> dict[str, Any]:
    """Checksums of every file under `folder` (collective): each process hashes every world-th file of one
    listing (rank 0's), so a sharded checkpoint is hashed in parallel."""
    names = broadcast_object(checkpoint_files(folder) if _rank() == 0 else None)
    parts = all_gather_objects(file_checksums(folder, names[_rank() :: _world()]))
    return {name: value for part in parts for name, value in part.items()}


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

    def finish(self, checksums: dict[str, Any] | None = None) -> Path:
        """Wait for the write, then (rank 0) write meta.json and rename the folder into place (`io.publish`;
        `checksums` None: rank 0 hashes the files itself). Idempotent."""
        if self.done:
            return self.final
        if self.future is not None:
            self.future.result()
        if _rank() == 0:
            publish(self.tmp, self.final, self.meta, checksums)
        self.done = True
        return self.final


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
    tmp = Path(broadcast_object(str(new_tmp(root, step)) if _rank() == 0 else None))  # made by rank 0
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
        pending.finish(_shared_checksums(tmp))
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
    state = load_state(path)  # plain data only
    only = bool(meta.get("trainable_only", False))  # the frozen base is not in it: rebuilt from pretrained
    if meta.get("format", FULL) == SHARDED:
        model_sd = get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=only))
        optim_sd = get_optimizer_state_dict(module, optimizer)  # initialises the optimizer state to load into
        tensors: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if ema is not None and meta.get("ema"):
            tensors["ema"] = ema  # loaded in place (local shards for DTensors)
        with _single_process_quiet():
            dcp.load(
                tensors,
                storage_reader=SafeFileSystemReader(str(path / DCP_DIR)),
                planner=SafeLoadPlanner(),
                no_dist=not is_distributed(),
            )
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


def resume_training_checkpoint(
    run_dir: str | Path,
    which: str | None,
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
) -> tuple[Path, dict[str, Any]] | None:
    """`checkpoint.resume` (None, `latest` or a folder) loaded into module, optimizer and EMA (collective).

    Rank 0 first removes what killed saves left (`io.cleanup_partial`). Then, newest first (`io.first_valid`),
    rank 0 verifies a candidate's checksums and every rank loads it; a damaged or unloadable one is skipped on
    every rank with a warning naming the file, and the previous one is tried (for `latest`; a named folder
    must be valid). Returns (folder, non-tensor state) or None when there is nothing to resume; raises
    `CheckpointError` when checkpoints exist but none is valid."""
    loaded: dict[str, Any] = {}

    def check(path: Path) -> list[str]:
        """Rank 0 verifies the checksums; if they hold, every rank loads; the problems of all ranks."""
        problems = broadcast_object(verify_checkpoint(path).problems if _rank() == 0 else None)
        if problems:
            return problems
        error = None
        try:
            loaded["state"] = load_training_checkpoint(path, module=module, optimizer=optimizer, ema=ema)
        except (Exception, CheckpointException) as exc:  # any failure to load: try the previous one
            error = f"cannot load: {_first_line(exc)}"
        return sorted({e for e in all_gather_objects(error) if e})

    if _rank() == 0:
        cleanup_partial(run_dir)
    barrier()
    # Every rank walks the same candidates (one shared folder listing) and `check` returns the same problems
    # on every rank, so all of them skip, load or fail together.
    found = first_valid(run_dir, which, check, warn=_rank() == 0)
    return (found, loaded["state"]) if found is not None else None
