"""Bucketed sampler at scale: a synthetic 10,000,000-row manifest through the opensora bucket policy.

Prints JSON: seconds to load the manifest's bucketing columns, seconds to assign buckets and build one rank's
sampler (the epoch-0 plan included), seconds to the first batch of indices, seconds to plan the next epoch,
and the process's peak RSS. The manifest is written first by a child process (not timed, and not part of
this process's peak RSS). Targets (issue #4): load + build <= 60 s, peak RSS <= 4 GiB, first batch < 1 s.

    python benchmarks/sampler_scale.py [--rows 10000000] [--world-size 8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A realistic Open-Sora 2.0-style config: 256px with every 4k+1 frame count up to 129 (and images), plus a
# 768px stage with lower keep probabilities and a (p, q) pair.
BUCKET_CONFIG = {
    "256px": {1: [1.0, 45], **{t: [1.0, max(1, 384 // t)] for t in range(5, 130, 4)}},
    "768px": {1: [0.5, 13], 33: [[0.5, 0.5], 4], 65: [0.4, 2], 97: [0.3, 1], 129: [0.3, 1]},
}


def write_manifest(path: Path, rows: int, seed: int = 0) -> None:
    """A synthetic manifest in the canonical schema (run in a child process)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    chunk = 1_000_000
    writer = None
    words = pa.array(
        [f"a clip of {w}" for w in ("a cat", "the sea", "a city", "a forest", "people", "a road")]
    )
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        short = rng.choice([240, 360, 480, 720, 1080, 2160], n, p=[0.1, 0.2, 0.25, 0.25, 0.15, 0.05])
        ratio = rng.choice([16 / 9, 4 / 3, 1.0, 9 / 16, 2.39, 3 / 4], n, p=[0.5, 0.15, 0.1, 0.15, 0.05, 0.05])
        landscape = ratio >= 1
        height = np.where(landscape, short, (short / ratio).astype(np.int64))
        width = np.where(landscape, (short * ratio).astype(np.int64), short)
        fps = rng.choice([24.0, 25.0, 30.0, 29.97, 50.0, 60.0], n)
        image = rng.random(n) < 0.05
        frames = np.where(image, 1, rng.integers(16, 1200, n))
        ids = pa.array(np.arange(start, start + n))
        path_col = pc.binary_join_element_wise("videos/", pc.cast(ids, pa.string()), ".mp4", "")
        table = pa.table(
            {
                "path": path_col,
                "text": pc.take(words, pa.array(rng.integers(0, len(words), n))),
                "num_frames": pa.array(frames, pa.int64()),
                "height": pa.array(height, pa.int64()),
                "width": pa.array(width, pa.int64()),
                "fps": pa.array(np.where(image, 0.0, fps)),
                "aspect_ratio": pa.array(height / width),
                "resolution": pa.array(height * width, pa.int64()),
                "is_image": pa.array(image),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--world-size", type=int, default=8, help="processes; rank 0's sampler is built")
    parser.add_argument("--keep", help="write the manifest here and keep it (default: a temp dir)")
    parser.add_argument("--write-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_only:
        write_manifest(Path(args.write_only), args.rows)
        return

    tmp = tempfile.TemporaryDirectory() if not args.keep else None
    folder = Path(args.keep or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.parquet"
    t = time.perf_counter()
    if not manifest.exists():
        cmd = [sys.executable, __file__, "--rows", str(args.rows), "--write-only", str(manifest)]
        subprocess.run(cmd, check=True)
    write_s = time.perf_counter() - t

    from frameloom.config import load_config
    from frameloom.data.buckets import build_policy, read_columns
    from frameloom.data.sampler import BucketBatchSampler, EpochPlanner

    cfg = load_config(
        None,
        ["data.bucket=opensora", "data.fps_max=24", f"data.manifest={manifest}", "seed=0"],
    )
    cfg.data.bucket_config = BUCKET_CONFIG

    t0 = time.perf_counter()
    cols = read_columns(manifest)
    t1 = time.perf_counter()
    policy = build_policy(cfg, cols)
    planner = EpochPlanner(policy, cfg.seed, cfg.data.megabatch)
    sampler = BucketBatchSampler(planner, rank=0, world_size=args.world_size, refs=False)
    sampler.prepare()  # the epoch-0 assignment and plan
    t2 = time.perf_counter()
    first = next(iter(sampler))
    t3 = time.perf_counter()
    planner.plan(1)
    t4 = time.perf_counter()
    plan = planner.plan(0)
    result = {
        "rows": len(cols),
        "world_size": args.world_size,
        "buckets": len(policy.table),
        "epoch0_samples_in_batches": int(plan.offsets[-1]),
        "epoch0_batches": plan.num_batches,
        "first_batch_size": len(first),
        "write_manifest_s_untimed": round(write_s, 2),
        "load_s": round(t1 - t0, 3),
        "assign_and_build_sampler_s": round(t2 - t1, 3),
        "load_plus_build_s": round(t2 - t0, 3),
        "first_batch_s": round(t3 - t2, 6),
        "next_epoch_plan_s": round(t4 - t3, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "targets": {"load_plus_build_s": 60, "peak_rss_gib": 4, "first_batch_s": 1},
    }
    print(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
