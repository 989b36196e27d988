"""What the reliability machinery costs when nothing goes wrong; printed as JSON.

- decode: seconds per clip of `decode_clip` in the loading process (one torch thread, as in a DataLoader
  worker) against the same clips through the decode sandbox (data/sandbox.py: a forked child, the clip
  copied back through a pipe), median of `--repeats` interleaved passes over a synthetic set; plus the
  one-time cost of forking the child. Also a whole loader: `ClipDataset` batches per second with `--workers`
  workers, `data.decode_timeout` 0 (no sandbox) against the default sandbox (interleaved rounds, median).
- checksums: SHA-256 throughput of checkpoint files (what `publish` adds to a save and `verify` costs), on
  a `--checkpoint-mb` file.

Usage: python benchmarks/reliability_overhead.py [--clips 16 --frames 33 --size 128 --repeats 5 --workers 2]
       [--checkpoint-mb 256]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from frameloom.checkpoint.integrity import file_sha256
from frameloom.data import synthetic
from frameloom.data.manifest import read_manifest
from frameloom.data.sampler import ResumableBatchSampler
from frameloom.data.sandbox import DecodeSandbox
from frameloom.data.video import ClipSpec, decode_clip
from frameloom.pipeline import ClipDataset


def per_clip(fns: dict, rows: list[dict], repeats: int) -> dict[str, float]:
    """Median seconds per clip of each decode function; passes interleaved, so load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for row in rows:
                fn(row)
            times[name].append((time.perf_counter() - start) / len(rows))
    return {name: statistics.median(t) for name, t in times.items()}


def loader_rates(
    manifest: Path, spec: ClipSpec, workers: int, batches: int, repeats: int
) -> dict[str, float]:
    """Batches per second of two loaders (no sandbox, sandbox), both kept alive and measured in interleaved
    rounds of `batches` (median), so load drifts hit both alike (and both start a round with their prefetched
    batches ready)."""
    iters = {}
    for name, timeout in (("no_sandbox", 0), ("sandbox", 60)):
        dataset = ClipDataset(manifest, spec, decode_timeout=timeout)
        sampler = ResumableBatchSampler(len(dataset), 4, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=len)
        iters[name] = iter(loader)
        next(iters[name])  # workers (and their sandboxes) started
    rates: dict[str, list[float]] = {name: [] for name in iters}
    for _ in range(repeats):
        for name, it in iters.items():
            start = time.perf_counter()
            for _ in itertools.islice(it, batches):
                pass
            rates[name].append(batches / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint-mb", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic.write_synthetic_set(root, num_clips=args.clips, seed=0, height=args.size, width=args.size,
                                      num_frames=args.frames, progress=False)  # fmt: skip
        manifest = root / "manifest.parquet"
        rows = read_manifest(manifest).to_pylist()
        spec = ClipSpec(num_frames=args.frames - 1, height=args.size, width=args.size)
        box = DecodeSandbox(timeout=60)
        start = time.perf_counter()
        box.decode(rows[0], spec, root=root, output="float")
        first = time.perf_counter() - start
        timed = per_clip(
            {
                "in_process": lambda r: decode_clip(r, spec, root=root, output="float"),
                "sandbox": lambda r: box.decode(r, spec, root=root, output="float"),
            },
            rows,
            args.repeats,
        )
        in_process, sandboxed = timed["in_process"], timed["sandbox"]
        box.close()
        # rounds much longer than the batches prefetched meanwhile (2 per worker), which come for free
        rates = loader_rates(manifest, spec, args.workers, 12 * args.workers, args.repeats)
        plain, boxed = rates["no_sandbox"], rates["sandbox"]

        blob = root / "blob.bin"
        with open(blob, "wb") as fh:
            fh.write(os.urandom(args.checkpoint_mb << 20))
        start = time.perf_counter()
        file_sha256(blob)
        hashing = time.perf_counter() - start
    clip_mb = 3 * (args.frames - 1) * args.size * args.size * 4 / 2**20
    print(json.dumps({
        "clip": {"frames": args.frames - 1, "size": args.size, "float32_mb": round(clip_mb, 2)},
        "decode_s_per_clip": {"in_process": round(in_process, 5), "sandbox": round(sandboxed, 5),
                              "overhead_pct": round(100 * (sandboxed / in_process - 1), 1)},
        "sandbox_first_clip_s": round(first, 4),
        "loader_batches_per_s": {"workers": args.workers, "no_sandbox": round(plain, 2), "sandbox": round(boxed, 2),
                                 "overhead_pct": round(100 * (plain / boxed - 1), 1)},
        "sha256_mb_per_s": round(args.checkpoint_mb / hashing, 1),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
