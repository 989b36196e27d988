"""Sandboxed decoding and the quarantine: a native crash or a hang costs one sample, batches stay full and
deterministic with 0 or 2 loader workers, quarantined samples are skipped the same way after a resume, and a
bounded fuzz run of mutated mp4s leaves the loader process alive."""

from __future__ import annotations

import itertools
import os
import random
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from frameloom.data import sandbox, synthetic
from frameloom.data.quarantine import Quarantine, read_quarantine
from frameloom.data.sampler import ResumableBatchSampler
from frameloom.data.sandbox import DecodeCrash, DecodeSandbox
from frameloom.data.video import ClipSpec, DecodeError, decode_clip
from frameloom.pipeline import ClipDataset
from reliability import crashing_decoder, write_corrupt_set, write_mixed_manifest

SPEC = ClipSpec(num_frames=4, height=8, width=8)
TIMEOUT = 1.5  # seconds a sample may take (the hang costs this much each time it is decoded)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("decode")
    synthetic.write_synthetic_set(root / "clean", num_clips=12, seed=0, height=8, width=8, num_frames=4)
    rows, truth = write_corrupt_set(root / "corrupt")
    manifest = write_mixed_manifest(root / "clean" / "manifest.parquet", root / "corrupt", rows,
                                    root / "mixed.parquet")  # fmt: skip
    return {"root": root, "rows": rows, "truth": truth, "manifest": manifest}


@pytest.fixture
def crashing(monkeypatch):
    """The sandbox's decoder segfaults/aborts on the two crash files (set before any child is forked)."""
    monkeypatch.setattr(sandbox, "decode_clip", crashing_decoder)


@pytest.mark.parametrize("through", ["shared memory", "pipe"])
def test_sandbox_returns_exactly_what_decode_clip_returns(data, monkeypatch, through):
    if through == "pipe":  # where there is no memfd
        monkeypatch.setattr(sandbox, "_new_shared_memory", lambda: None)
    box = DecodeSandbox(timeout=30)
    clean = data["root"] / "clean"
    for row in synthetic_rows(clean)[:3]:
        for output in ("float", "uint8"):
            got = box.decode(row, SPEC, root=clean, output=output, draw=(0, 1, 2))
            assert torch.equal(got, decode_clip(row, SPEC, root=clean, output=output, draw=(0, 1, 2)))
    assert box.started == 1  # one persistent child for every sample
    box.close()


def synthetic_rows(folder: Path) -> list[dict]:
    from frameloom.data.manifest import read_manifest

    return read_manifest(folder / "manifest.parquet").to_pylist()


def test_crash_and_hang_cost_only_their_sample(data, crashing):
    box = DecodeSandbox(timeout=TIMEOUT)
    folder = data["root"] / "corrupt"
    outcome = {}
    start = time.monotonic()
    for row in data["rows"]:
        try:
            box.decode(row, SPEC, root=folder, output="float")
            outcome[row["path"]] = None
        except DecodeCrash as exc:
            outcome[row["path"]] = exc.kind
            assert exc.reason in ("decoder crashed (SIGSEGV)", "decoder crashed (SIGABRT)",
                                  f"no result within {TIMEOUT:g} s (decoder hung)")  # fmt: skip
        except DecodeError:
            outcome[row["path"]] = "error"
    seconds = time.monotonic() - start
    assert {p: k for p, k in outcome.items() if k} == data["truth"]
    clean = data["root"] / "clean"
    assert box.decode(synthetic_rows(clean)[0], SPEC, root=clean).shape == (3, 4, 8, 8)  # and on it goes
    assert box.started == 4  # the first child, then a new one after each of 2 crashes and 1 hang
    print(f"\n{len(outcome)} files: {sum(1 for k in outcome.values() if k)} failed as expected "
          f"({sum(k == 'crash' for k in outcome.values())} crashes, "
          f"{sum(k == 'timeout' for k in outcome.values())} hang) in {seconds:.1f} s; this process alive")  # fmt: skip
    box.close()


def collate(items: list[dict]) -> dict:
    return {"index": [it["index"] for it in items], "failures": [f for it in items for f in it["failures"]]}


def batches(dataset: ClipDataset, workers: int, steps: int, quarantine: Quarantine) -> list[dict]:
    """`steps` batches of 4; each batch's failures go to `quarantine` as it is consumed (as the trainer does)."""
    sampler = ResumableBatchSampler(len(dataset), 4, seed=3, refs=True)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    out = []
    for batch in itertools.islice(iter(loader), steps):
        quarantine.record(batch["failures"])
        out.append(batch)
    return out


def test_batches_stay_full_and_identical_with_0_and_2_workers_and_after_resume(data, crashing, tmp_path):
    """Every corrupt sample of two epochs is replaced the same way with 0 or 2 workers; the consumed
    batches' failures are exactly the ground truth; a run that reads the quarantine back skips the
    crashing and hanging files without decoding them and still builds the same batches."""
    steps = 2 * (26 // 4)  # two epochs of the 26-row manifest
    runs, lists = {}, {}
    for workers in (0, 2):
        quarantine = Quarantine(tmp_path / f"quarantine-{workers}.jsonl")
        dataset = ClipDataset(
            data["manifest"], SPEC, seed=3, decode_timeout=TIMEOUT, quarantine=quarantine.path
        )
        start = time.monotonic()
        runs[workers] = batches(dataset, workers, steps, quarantine)
        print(f"\n{workers} workers: {steps} batches in {time.monotonic() - start:.1f} s")
        lists[workers] = read_quarantine(quarantine.path)
    assert all(len(b["index"]) == 4 for b in runs[0] + runs[2])  # never a short batch
    assert [b["index"] for b in runs[0]] == [b["index"] for b in runs[2]]
    assert sorted(map(str, lists[0])) == sorted(map(str, lists[2]))  # the same entries, reasons included
    corrupt = data["root"] / "corrupt"
    assert {Path(e["path"]).name: e["kind"] for e in lists[0]} == data["truth"]
    assert all(Path(e["path"]).parent == corrupt for e in lists[0])
    # resume: the quarantine is known up front; crashing/hanging files are not decoded again
    quarantine = Quarantine(tmp_path / "quarantine-0.jsonl")
    dataset = ClipDataset(data["manifest"], SPEC, seed=3, decode_timeout=TIMEOUT, quarantine=quarantine.path)
    start = time.monotonic()
    again = batches(dataset, 0, steps, quarantine)
    seconds = time.monotonic() - start
    assert [b["index"] for b in again] == [b["index"] for b in runs[0]]
    # one child for the whole run: a crash or a hang (the child is killed at the timeout) would fork another
    assert dataset.sandbox.started == 1, seconds
    assert read_quarantine(quarantine.path) == lists[0]


def test_quarantine_file_keeps_one_line_per_path_and_survives_a_torn_line(tmp_path):
    q = Quarantine(tmp_path / "quarantine.jsonl")
    entry = {"path": "a.mp4", "row": 3, "kind": "timeout", "reason": "no result within 2 s (decoder hung)"}
    assert q.record([entry, entry]) == 1
    with open(q.path, "ab") as fh:
        fh.write(b'{"path": "torn.mp4", "row": 4, "ki')  # a kill mid-line
    other = Quarantine(q.path)  # another process
    assert other.known("a.mp4")["reason"] == entry["reason"]
    assert other.record([dict(entry, path="b.mp4", kind="error")]) == 1
    assert [e["path"] for e in read_quarantine(q.path)] == ["a.mp4", "b.mp4"]
    assert other.known("b.mp4") is None  # an ordinary decode error is tried again (cheap, deterministic)
    assert q.known("a.mp4") is not None and q.known("b.mp4") is None


@pytest.mark.slow
def test_decoder_fuzz_is_contained(data, tmp_path):
    """Random byte mutations of valid mp4s decoded through the sandbox for a bounded time: every outcome is a
    clip, a DecodeError or a contained crash/hang; this process never dies."""
    clean = data["root"] / "clean"
    seeds = [clean / r["path"] for r in synthetic_rows(clean)[:4]]
    rng = random.Random(0)
    box = DecodeSandbox(timeout=2.0)
    counts = {"decoded": 0, "error": 0, "crash": 0, "timeout": 0}
    budget, start, tried = 10.0, time.monotonic(), 0
    while time.monotonic() - start < budget:
        data_bytes = bytearray(rng.choice(seeds).read_bytes())
        for _ in range(rng.randint(1, 16)):  # flip, overwrite or drop bytes
            k = rng.randrange(len(data_bytes))
            op = rng.random()
            if op < 0.6:
                data_bytes[k] ^= 1 << rng.randrange(8)
            elif op < 0.9:
                data_bytes[k] = rng.randrange(256)
            else:
                del data_bytes[k : k + rng.randint(1, 64)]
        path = tmp_path / f"fuzz-{tried % 8}.mp4"
        path.write_bytes(bytes(data_bytes))
        row = {"path": str(path), "num_frames": 4, "fps": 8.0}
        try:
            box.decode(row, SPEC, output="float")
            counts["decoded"] += 1
        except DecodeCrash as exc:
            counts[exc.kind] += 1
        except DecodeError:
            counts["error"] += 1
        tried += 1
    box.close()
    print(f"\nfuzz: {tried} inputs in {time.monotonic() - start:.0f} s: {counts}; children forked {box.started}; "
          f"main process alive (pid {os.getpid()})")  # fmt: skip
    assert tried > 50 and sum(counts.values()) == tried
    assert box.started == 1 + counts["crash"] + counts["timeout"]
