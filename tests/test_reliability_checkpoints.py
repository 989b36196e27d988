"""Checkpoint integrity under damage: replacement and pruning killed midway (#11 defect 9), checksums in
meta.json and `frameloom verify`, resume falling back past tampered checkpoints, and no pickle payload ever
running (state.pt, DCP metadata and shards, safetensors, meta.json)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from frameloom.checkpoint import io as ckpt
from frameloom.checkpoint.distributed import resume_training_checkpoint
from frameloom.checkpoint.integrity import file_checksums, verify_checkpoint
from frameloom.checkpoint.safe import MetadataUnpickler, UnsafeCheckpointError
from frameloom.checkpoint.safe_dcp import SafeFileSystemReader
from frameloom.cli import main
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.pipeline import run_cache
from frameloom.train.trainer import Trainer
from tiny import TINY

# ---------------------------------------------------------------- replacing and pruning, killed midway


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an Exception, so no handler catches it)."""


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), value), "b": torch.full((64,), value)}


def save(run: Path, step: int, value: float) -> Path:
    return ckpt.save_checkpoint(run, step, model=weights(value), state={"step": step}, ema=weights(-value))


def complete_per_step(run: Path) -> dict[int, float]:
    """After cleanup: step -> the value of its (loadable, complete) checkpoint; fails on a damaged one."""
    ckpt.cleanup_partial(run)
    out = {}
    for path in ckpt.list_checkpoints(run):
        loaded = ckpt.load_checkpoint(path)
        out[loaded["step"]] = float(loaded["model"]["w"][0, 0])
        assert torch.equal(loaded["ema"]["w"], -loaded["model"]["w"])
    return out


def rmtree_killed_after(files: int):
    """shutil.rmtree that deletes `files` files of the tree, then the process 'dies'."""

    def rmtree(path, ignore_errors=False, onerror=None, **kw):  # noqa: ARG001
        victims = sorted(p for p in Path(path).rglob("*") if p.is_file())
        for p in victims[:files]:
            p.unlink()
        raise Killed

    return rmtree


@pytest.mark.parametrize("deleted", [1, 3])
def test_replacing_a_step_killed_mid_delete_keeps_one_complete_checkpoint(tmp_path, monkeypatch, deleted):
    """#11 defect 9: re-saving step 3 used to rmtree the old folder in place and then rename the new one; a
    kill during the delete left a step-3 folder with meta.json but missing weights."""
    run = tmp_path / "run"
    save(run, 2, 2.0)
    save(run, 3, 3.0)
    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_after(deleted))
    with pytest.raises(Killed):
        save(run, 3, 3.5)  # the same step again (e.g. SIGTERM right after a periodic save)
    monkeypatch.undo()
    found = complete_per_step(run)
    assert found[2] == 2.0 and found[3] in (3.0, 3.5)  # one complete checkpoint per step


def test_replacing_a_step_killed_between_renames_restores_the_old_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save(run, 3, 3.0)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # after the old folder moved away, before the new one moves in
            raise Killed
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        save(run, 3, 3.5)
    monkeypatch.undo()
    assert complete_per_step(run) == {3: 3.0}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]


def test_pruning_killed_mid_delete_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save(run, step, float(step))
    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_after(1))
    with pytest.raises(Killed):
        ckpt.prune_checkpoints(run, keep_last=1)
    monkeypatch.undo()
    found = complete_per_step(run)
    assert found[3] == 3.0 and set(found) <= {1, 2, 3}
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # cleaned up


# ---------------------------------------------------------------- checksums, verify, retention


def test_meta_lists_a_checksum_for_every_file_and_verify_names_damage(tmp_path, capsys):
    run = tmp_path / "run"
    good, bad = save(run, 1, 1.0), save(run, 2, 2.0)
    meta = json.loads((good / "meta.json").read_text())
    assert sorted(meta["checksums"]) == ["ema.safetensors", "model.safetensors", "state.pt"]
    assert meta["checksums"] == file_checksums(good)
    assert main(["verify", str(run)]) == 0
    assert "2 checkpoint(s): 2 ok, 0 damaged" in capsys.readouterr().out
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit
    (bad / "model.safetensors").write_bytes(bytes(data))
    (bad / "extra.bin").write_bytes(b"x")
    assert verify_checkpoint(bad).problems == [
        "extra.bin: not listed in meta.json",
        "model.safetensors: checksum mismatch",
    ]
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step-00000002  DAMAGED  extra.bin: not listed" in out and "1 ok, 1 damaged" in out
    assert main(["verify", str(tmp_path / "nope")]) == 2


def test_retention_never_deletes_the_newest_valid_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save(run, step, float(step))
    (ckpt.list_checkpoints(run)[-1] / "state.pt").write_bytes(b"")  # step 3 damaged
    removed = ckpt.prune_checkpoints(run, keep_last=1)
    assert [p.name for p in removed] == ["step-00000001"]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002", "step-00000003"]


def test_latest_falls_back_with_a_warning_naming_the_file(tmp_path, caplog):
    run = tmp_path / "run"
    save(run, 1, 1.0)
    newest = save(run, 2, 2.0)
    with open(newest / "ema.safetensors", "r+b") as fh:
        fh.truncate(100)
    with caplog.at_level(logging.WARNING, logger="frameloom.checkpoint"):
        assert ckpt.resolve_checkpoint(run, "latest").name == "step-00000001"
    assert "ema.safetensors:" in caplog.text and "step-00000002" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="ema.safetensors"):
        ckpt.resolve_checkpoint(run, str(newest))  # a folder named explicitly must be valid


# ---------------------------------------------------------------- tampered checkpoints at resume


class Payload:
    """A pickle that runs code when unpickled: it creates `marker` (counted by the tests)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'a').write('ran\\n')",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Trainer]:
    """Two tiny runs of 2 steps with a checkpoint per step: `full` (safetensors) and `sharded` (DCP); their
    Trainers stay built, so tests only call the resume path."""
    root = tmp_path_factory.mktemp("tamper")
    synthetic.write_synthetic_set(root / "data", num_clips=8, seed=0, height=8, width=8, num_frames=4)
    manifest = root / "data" / "manifest.parquet"
    out = {}
    for fmt in ("full", "sharded"):
        cfg = load_config(
            None,
            [*TINY, f"data.manifest={manifest}", f"run_dir={root / fmt}", "train.steps=2",
             "checkpoint.every=1", f"checkpoint.format={fmt}", "train.ema_decay=0.9"],
        )  # fmt: skip
        if not out:
            run_cache(cfg, progress=False)
        trainer = Trainer(cfg)
        trainer.fit()
        out[fmt] = trainer
    return out


def resume_copy(trainer: Trainer, tmp_path: Path, tamper) -> tuple[Path | None, str]:
    """Copy the run, let `tamper(step-2 folder)` damage it, resume `latest`; -> (folder resumed, warnings)."""
    run = tmp_path / "run"
    shutil.copytree(trainer.run_dir, run)
    tamper(run / "checkpoints" / "step-00000002")
    found = resume_training_checkpoint(
        run, "latest", module=trainer.module, optimizer=trainer.optimizer, ema=trainer.ema.state_dict()
    )
    return (found[0] if found else None), found


def reseal(folder: Path) -> None:
    """Rewrite meta.json's checksums to match the tampered files (an attacker who also edits meta.json)."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["checksums"] = file_checksums(folder)
    (folder / "meta.json").write_text(json.dumps(meta))


def truncate_shard(folder: Path) -> None:
    shard = folder / "dcp" / "__0_0.distcp" if (folder / "dcp").is_dir() else folder / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)


def flip_bits(folder: Path) -> None:
    target = folder / "state.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x01
    target.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": truncate_shard,
    "missing marker": lambda f: (f / "meta.json").unlink(),
    "flipped bits": flip_bits,
}


@pytest.mark.parametrize("fmt", ["full", "sharded"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_past_a_damaged_checkpoint(runs, tmp_path, caplog, fmt, damage):
    with caplog.at_level(logging.WARNING, logger="frameloom.checkpoint"):
        path, (_, state) = resume_copy(runs[fmt], tmp_path, DAMAGE[damage])
    assert path.name == "step-00000001" and state["step"] == 1
    step1 = ckpt.load_checkpoint(path)["model"]  # the model now holds exactly step 1's weights
    assert all(torch.equal(step1[k], v) for k, v in runs[fmt].module.state_dict().items())
    assert "step-00000002 is damaged" in caplog.text
    named = {"truncated shard": "distcp" if fmt == "sharded" else "model.safetensors",
             "missing marker": "meta.json", "flipped bits": "state.pt"}[damage]  # fmt: skip
    assert named in caplog.text
    print(f"\n{fmt} / {damage}: resumed from {path.name}; warning: {caplog.records[-1].getMessage()}")


def plant_everywhere(marker: Path, fmt: str):
    """A tamper function that puts a code-running pickle into every file the resume path reads."""

    def tamper(folder: Path) -> None:
        payload = pickle.dumps(Payload(marker))
        torch.save({"step": 2, "scheduler": Payload(marker)}, folder / "state.pt")
        if fmt == "full":
            for name in ("model.safetensors", "ema.safetensors"):
                (folder / name).write_bytes(payload)
        else:
            (folder / "dcp" / ".metadata").write_bytes(payload)
        (folder / "meta.json").write_bytes(payload)

    return tamper


def plant_one(marker: Path, name: str, trainer: Trainer):
    """A tamper function that plants a payload into one file and re-seals the checksums."""

    def tamper(folder: Path) -> None:
        if name == "state.pt":
            torch.save({"step": 2, "scheduler": Payload(marker)}, folder / "state.pt")
        elif name == "dcp/.metadata":
            (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        elif name == "dcp/*.distcp":  # a genuine DCP checkpoint whose non-tensor entry is the payload
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            optim = get_optimizer_state_dict(trainer.module, trainer.optimizer)
            optim["param_groups"][0]["lr"] = Payload(marker)
            shutil.rmtree(folder / "dcp")
            tensors = {"model": get_model_state_dict(trainer.module), "optim": optim}
            dcp.save(tensors, checkpoint_id=folder / "dcp", no_dist=True)
        else:
            (folder / name).write_bytes(pickle.dumps(Payload(marker)))
        reseal(folder)

    return tamper


PLANTED = {"full": ["state.pt", "model.safetensors", "ema.safetensors"],
           "sharded": ["state.pt", "dcp/.metadata", "dcp/*.distcp"]}  # fmt: skip


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_pickle_payloads_never_run(runs, tmp_path, fmt):
    """Payloads in every file the resume path reads: once with the checksums left alone (verification rejects
    the folder before reading it), then one file at a time with meta.json re-sealed to match (the readers
    themselves refuse); always a fallback to step 1, and the payload never runs."""
    marker = tmp_path / "executed"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is live: plain unpickling runs it
    assert marker.read_text() == "ran\n"
    marker.unlink()
    cases = {"everywhere": plant_everywhere(marker, fmt)}
    cases.update({name: plant_one(marker, name, runs[fmt]) for name in PLANTED[fmt]})
    for i, (name, tamper) in enumerate(cases.items()):
        path, _ = resume_copy(runs[fmt], tmp_path / str(i), tamper)
        assert path.name == "step-00000001", name
    executed = marker.read_text().count("ran") if marker.exists() else 0
    print(f"\n{fmt}: {len(cases)} tampered checkpoints ({', '.join(cases)}): fallback {len(cases)}/{len(cases)}, "
          f"payloads executed {executed}")  # fmt: skip
    assert executed == 0


def test_dcp_metadata_reader_refuses_globals(tmp_path):
    """The DCP index is unpickled with an allow-list: a real one loads, a planted global is refused."""
    dcp.save({"w": torch.arange(6.0).reshape(2, 3)}, checkpoint_id=tmp_path / "ok", no_dist=True)
    metadata = SafeFileSystemReader(str(tmp_path / "ok")).read_metadata()
    assert list(metadata.state_dict_metadata) == ["w"]
    marker = tmp_path / "executed"
    with open(tmp_path / "evil", "wb") as fh:
        fh.write(pickle.dumps(Payload(marker)))
    with open(tmp_path / "evil", "rb") as fh, pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        MetadataUnpickler(fh).load()
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    state = ckpt.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# ---------------------------------------------------------------- restart after a crash elsewhere


def test_a_kill_while_building_the_tiny_text_encoder_needs_no_cleanup(tmp_path, monkeypatch):
    """The quickstart's tiny-byt5 is built on first use; a kill mid-build used to leave a folder with
    config.json but no weights, which every later start took as built."""
    from frameloom.models import text
    from frameloom.models.text import T5TextEncoder
    from frameloom.pipeline import text_encoder_dir

    cfg = load_config(None, [*TINY, f"run_dir={tmp_path / 'runs' / 'a'}"])
    real = text.build_tiny_t5

    def killed_build(out, **kw):
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")  # the first file written, then the kill
        raise Killed

    monkeypatch.setattr(text, "build_tiny_t5", killed_build)
    with pytest.raises(Killed):
        text_encoder_dir(cfg)
    monkeypatch.setattr(text, "build_tiny_t5", real)
    path = text_encoder_dir(cfg)  # the restart: no manual cleanup
    assert T5TextEncoder.from_pretrained(path).dim == 32
