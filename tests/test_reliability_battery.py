"""The reliability battery under violence, on CPU with 2 gloo ranks and 2 loader workers each, a tiny model:

- kill -9 of the whole process tree at random moments, half of them inside a checkpoint write (its windows
  widened by sleeps), 10 times in a row, many across epoch boundaries: every resume succeeds, every
  checkpoint left on disk verifies, and the losses, sample ids and final weights equal an uninterrupted run's;
- a corrupt-clip set (0-byte, truncated at 10/50/90%, moov cut, flipped bytes, wrong frame count, variable
  frame rate, 1 frame, missing, a FIFO that hangs the decoder, two files the decoder crashes on) mixed into
  a real dataset: training survives with full batches, and quarantine.jsonl equals the ground truth,
  identically in an uninterrupted run and in a run killed and resumed.

Each test prints its figures. Runs are forked from the test process (tests/reliability.py `Tree`), so a
launch costs only building the run.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from frameloom.checkpoint import io as ckpt
from frameloom.checkpoint.integrity import verify_checkpoint
from frameloom.data import sandbox, synthetic
from frameloom.data.quarantine import read_quarantine
from frameloom.pipeline import run_cache
from frameloom.train.metrics import read_metrics
from reliability import (
    Tree,
    crashing_decoder,
    last_batches,
    read_jsonl,
    train_recorded,
    wait_gone,
    write_corrupt_set,
    write_mixed_manifest,
)
from test_parallel import config as parallel_config
from tiny import TINY

pytestmark = pytest.mark.slow

STEPS = 30  # 3 steps per epoch (24 clips, 2 ranks x batch 4): 10 epochs
COMMON = ["data.num_workers=2", "checkpoint.every=2", "checkpoint.keep_last=2", "train.ema_decay=0.9"]


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def overrides(manifest: Path, run: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.manifest={manifest}", f"run_dir={run}", "train.ema_decay=0.9", "checkpoint.every=0",
            *COMMON, *extra]  # fmt: skip


def wait_for(records: Path, predicate, since: int = 0, count: int = 1, timeout: float = 120.0) -> None:
    """Until `count` records after the first `since` satisfy `predicate`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for r in read_jsonl(records)[since:] if predicate(r)) >= count:
            return
        time.sleep(0.01)
    raise TimeoutError("the event never came")


def test_kill9_of_the_whole_tree_ten_times(tmp_path):
    root = tmp_path
    synthetic.write_synthetic_set(root / "data", num_clips=24, seed=0, height=8, width=8, num_frames=4)
    manifest = root / "data" / "manifest.parquet"
    run_cache(parallel_config(manifest, root / "runs" / "cache"), progress=False)  # also builds tiny-byt5
    shm_before = shm_entries()
    widen = 0.1

    reference = root / "runs" / "reference"
    (reference / "rec").mkdir(parents=True)
    assert (
        Tree(
            train_recorded, (overrides(manifest, reference, f"train.steps={STEPS}"), reference / "rec")
        ).wait(300)
        == 0
    )

    run = root / "runs" / "killed"
    records = run / "rec"
    records.mkdir(parents=True)
    args = (overrides(manifest, run, f"train.steps={STEPS}", "checkpoint.resume=latest"), records, widen)
    rng = random.Random(16)
    kills = []
    for i in range(10):
        before = len(read_jsonl(records / "rank0.jsonl"))
        tree = Tree(train_recorded, args)
        if i % 2 == 0:  # inside the 1st or 2nd checkpoint write: shards, meta.json, rename, prune
            wait_for(records / "rank0.jsonl", lambda r: "publish" in r, since=before, count=rng.randint(1, 2))
            time.sleep(rng.uniform(0, 3 * widen))
            where = "save"
        else:  # anywhere in training
            wait_for(records / "rank0.jsonl", lambda r: "slot" in r, since=before)
            time.sleep(rng.uniform(0, 2.0))
            where = "step"
        assert tree.leader.exitcode is None, "the run ended before it could be killed"
        tree.kill()
        seconds, left = wait_gone(tree.sid, 10)
        assert left == [], f"processes survived kill -9 of the tree: {left}"
        events = read_jsonl(records / "rank0.jsonl")[before:]
        resumed = next(e for e in events if "resumed" in e)
        last_step = max((e["step"] for e in events if "slot" in e), default=resumed["step"])
        # every checkpoint on disk is complete and intact
        folders = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
        damaged = [f.name for f in folders if not verify_checkpoint(f).ok]
        assert damaged == []
        kills.append({"kill": i + 1, "where": where, "resumed_from": resumed["resumed"], "killed_in_step": last_step,
                      "epochs": f"{(resumed['step']) // 3}->{(last_step - 1) // 3}", "intact": len(folders)})  # fmt: skip
    final = Tree(train_recorded, args)
    assert final.wait(300) == 0
    events = read_jsonl(records / "rank0.jsonl")
    resumes = [e for e in events if "resumed" in e]
    assert len(resumes) == 11 and events[-1]["done"] == STEPS

    # the killed-and-resumed run trained exactly what the uninterrupted one did
    ref_metrics, metrics = read_metrics(reference), read_metrics(run)
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in metrics] == [r["loss"] for r in ref_metrics]
    assert last_batches(records) == last_batches(reference / "rec")
    a, b = (
        ckpt.load_checkpoint(ckpt.latest_checkpoint(reference)),
        ckpt.load_checkpoint(ckpt.latest_checkpoint(run)),
    )
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # cleaned by the resumes
    assert shm_entries() - shm_before == set()
    across = sum(k["epochs"].split("->")[0] != k["epochs"].split("->")[1] for k in kills)
    print("\n" + "\n".join(json.dumps(k) for k in kills))
    print(f"kill -9 battery: resumed 10/10 ({across} across an epoch boundary, "
          f"{sum(k['where'] == 'save' for k in kills)} during a save); losses, sample ids and weights equal "
          f"the uninterrupted run's over {STEPS} steps; /dev/shm leftovers 0")  # fmt: skip


def test_corrupt_clips_train_and_quarantine_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "decode_clip", crashing_decoder)  # inherited by every forked process
    root = tmp_path
    synthetic.write_synthetic_set(root / "clean", num_clips=26, seed=0, height=8, width=8, num_frames=4)
    rows, truth = write_corrupt_set(root / "corrupt")
    manifest = write_mixed_manifest(
        root / "clean" / "manifest.parquet", root / "corrupt", rows, root / "mixed.parquet"
    )
    steps = 10  # 40 rows = 5 steps per epoch: every corrupt file is met in epoch 0 and again in epoch 1
    common = [
        "data.decode_timeout=2",
        "data.use_cache=never",
        "checkpoint.every=2",
        "model.text_encoder=tiny-byt5",
    ]

    def launch(name: str, *extra: str) -> Path:
        run = root / "runs" / name
        (run / "rec").mkdir(parents=True, exist_ok=True)
        args = (overrides(manifest, run, *common, *extra), run / "rec")
        return run, Tree(train_recorded, args)

    start = time.monotonic()
    whole, tree = launch("whole", f"train.steps={steps}")
    assert tree.wait(300) == 0
    seconds = time.monotonic() - start
    killed, tree = launch("killed", f"train.steps={steps}", "checkpoint.resume=latest")
    wait_for(killed / "rec" / "rank0.jsonl", lambda r: r.get("step", 0) >= 6 and "slot" in r)
    tree.kill()
    _, tree = launch("killed", f"train.steps={steps}", "checkpoint.resume=latest")
    assert tree.wait(300) == 0

    batches = {name: last_batches(root / "runs" / name / "rec") for name in ("whole", "killed")}
    assert batches["whole"] == batches["killed"]
    assert (
        all(len(b) == 8 for b in batches["whole"].values()) and len(batches["whole"]) == steps
    )  # never short
    lists = {name: read_quarantine(root / "runs" / name / "quarantine.jsonl") for name in ("whole", "killed")}
    assert {Path(e["path"]).name: e["kind"] for e in lists["whole"]} == truth
    canonical = {name: sorted(json.dumps(e, sort_keys=True) for e in lists[name]) for name in lists}
    assert canonical["whole"] == canonical["killed"]
    losses = {name: [r["loss"] for r in read_metrics(root / "runs" / name)] for name in lists}
    assert losses["whole"] == losses["killed"]
    kinds = {k: sum(v == k for v in truth.values()) for k in ("error", "crash", "timeout")}
    print(f"\ncorrupt set: {len(rows)} files ({kinds}) among 26 clean clips; 2 ranks x 2 workers trained "
          f"{steps} steps in {seconds:.1f} s with full batches; quarantine ({len(lists['whole'])} entries) == "
          f"ground truth, identical in the killed-and-resumed run; losses identical")  # fmt: skip
