"""The data layer at 10 million rows: prepare --trust-metadata, convert, and the cached dataset's start-up.

Prints one JSON object. Each measured step runs in its own child process, so its wall time and peak RSS are
its own (``ru_maxrss`` of the child). Steps and targets (issue #10):

- ``prepare``: ``frameloom prepare meta.parquet --trust-metadata`` on an Open-Sora table of N rows whose
  paths name real (empty) files; target <= 120 s and <= 4 GiB;
- ``convert``: the manifest to Open-Sora Parquet (and, with ``--all-formats``, every other dialect); target
  <= 120 s and <= 4 GiB each;
- ``cache_startup``: ``CachedClipDataset`` over the manifest with a complete key index, then ``missing()``;
  target <= 30 s, <= 4 GiB and zero video bytes read (the media files are deleted before this step, and
  ``file_identity`` is counted: only the manifest's own identity may be read).

The source table is written first by a child process (not timed). Rows point at ``--files`` distinct files in
folders of 1,000 (scene cuts: rows per file = N / files); the per-file cost of the checks is reported, so a
run with as many files as rows can be extrapolated. Run it on a quiet machine for reference figures:

    python benchmarks/data_scale.py [--rows 10000000] [--files 100000] [--keep DIR] [--all-formats]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _child(code: str, timeout: float = 3600) -> dict:
    """Run ``code`` in a fresh interpreter; it leaves its figures in a dict ``out``. Returns ``out`` plus the
    step's wall seconds and the child's own peak RSS in GiB (``ru_maxrss`` of the child itself)."""
    epilogue = (
        "\nimport json as _j, resource as _r\n"
        "_u = _r.getrusage(_r.RUSAGE_SELF)\n"
        "out['peak_rss_gib'] = round(_u.ru_maxrss / 2**20, 3)\n"
        "out['cpu_seconds'] = round(_u.ru_utime + _u.ru_stime, 2)\n"
        "print(_j.dumps(out))\n"
    )
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + epilogue], capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    out = json.loads(lines[-1])
    out["seconds"] = round(seconds, 2)  # the whole child, interpreter start and imports included
    return out


def write_source(root: Path, rows: int, files: int) -> None:
    """N rows of an Open-Sora table (complete metadata) over ``files`` empty files (child process)."""
    _child(
        f"""
        import os, numpy as np, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
        from pathlib import Path
        root, rows, files = Path({str(root)!r}), {rows}, {files}
        for d in range((files + 999) // 1000):
            folder = root / "videos" / f"{{d:05d}}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(d * 1000, min(files, (d + 1) * 1000)):
                open(folder / f"{{i:08d}}.mp4", "wb").close()
        rng = np.random.default_rng(0)
        writer = None
        chunk = 1_000_000
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            idx = np.arange(start, start + n) % files
            folder = pc.utf8_lpad(pc.cast(pa.array(idx // 1000), pa.string()), 5, "0")
            name = pc.utf8_lpad(pc.cast(pa.array(idx), pa.string()), 8, "0")
            path = pc.binary_join_element_wise("videos/", folder, "/", name, ".mp4", "")
            h = rng.choice([240, 480, 720, 1080], n)
            w = (h * 16 // 9).astype(np.int64)
            frames = rng.integers(16, 600, n)
            cut = rng.integers(0, 8, n)
            table = pa.table({{
                "path": path,
                "text": pc.binary_join_element_wise("a clip of scene ", pc.cast(pa.array(np.arange(start, start + n)), pa.string()), ""),
                "num_frames": pa.array(frames + cut, pa.int64()),
                "height": pa.array(h, pa.int64()),
                "width": pa.array(w, pa.int64()),
                "aspect_ratio": pa.array(h / w),
                "resolution": pa.array(h * w, pa.int64()),
                "fps": pa.array(rng.choice([24.0, 25.0, 29.97, 30.0, 60.0], n)),
                "aes": pa.array(rng.uniform(3, 7, n)),
            }})
            writer = writer or pq.ParquetWriter(str(root / "meta.parquet"), table.schema)
            writer.write_table(table)
        writer.close()
        out = {{}}
        """
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--files", type=int, default=100_000, help="distinct media files the rows point at")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    ap.add_argument("--all-formats", action="store_true", help="also convert to every other dialect")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="frameloom-data-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict = {"rows": args.rows, "files": args.files, "cpus": os.cpu_count(),
                    "load_average": round(os.getloadavg()[0], 2)}  # fmt: skip
    try:
        write_source(root, args.rows, args.files)
        result["prepare"] = _child(
            f"""
            from frameloom.data.prepare import prepare
            s = prepare({str(root / "meta.parquet")!r}, {str(root / "m" / "manifest.parquet")!r}, fmt="opensora",
                        progress=False, trust_metadata=True)
            out = {{"kept": s.kept, "rejected": s.rejected}}
            """
        )
        result["prepare"]["us_per_row"] = round(result["prepare"]["seconds"] / args.rows * 1e6, 2)
        targets = {"opensora": ("opensora", "o/meta.parquet")}
        if args.all_formats:
            targets.update({"opensora-csv": ("opensora", "o/meta.csv"), "pyramid": ("pyramid", "p/data.jsonl"),
                            "opensora-plan": ("opensora-plan", "pl/data.txt"), "cogvideox": ("cogvideox", "c"),
                            "folder": ("folder", "f")})  # fmt: skip
        result["convert"] = {}
        for name, (fmt, out) in targets.items():
            result["convert"][name] = _child(
                f"""
                from frameloom.data.dialects import convert_manifest
                r = convert_manifest({str(root / "m" / "manifest.parquet")!r}, {fmt!r}, {str(root / out)!r})
                out = {{"rows": r.rows}}
                """
            )
        shutil.rmtree(root / "videos")  # start-up must not need a single video
        cache_args = f"""
            from frameloom.data.video import ClipSpec
            manifest = {str(root / "m" / "manifest.parquet")!r}
            spec, codec_id, text_id = ClipSpec(16, height=64, width=64), "pixel-v1", "bench-text"
            store_root = {str(root / "cache")!r}
            """
        # A complete build's key index, as build_cache writes it (64 real latent entries, cycled), and the text
        # entries of the rows the spot check reads: set up in a child of its own (not measured).
        _child(
            cache_args
            + """
            import numpy as np, torch
            from frameloom.cache.index import run_key, write_index
            from frameloom.cache.keys import text_key, video_key
            from frameloom.cache.store import CacheStore
            from frameloom.data.manifest import manifest_rows, read_manifest
            store = CacheStore(store_root)
            n = manifest_rows(manifest)
            real = [video_key(f"file{k}", spec, codec_id) for k in range(64)]
            for k in real:
                store.put("video", k, {"latent": torch.zeros(3, 16, 8, 8)})
            write_index(store.root, run_key(manifest, spec, codec_id, text_id), (0, 1), np.arange(n),
                        np.full(n, -1), [real[i % 64] for i in range(n)], np.ones(n, bool))
            texts = read_manifest(manifest, columns=["text"]).column("text")
            for i in np.linspace(0, n - 1, 32).astype(np.int64).tolist():
                store.put("text", text_key(texts[i].as_py(), text_id),
                          {"emb": torch.zeros(1, 4), "mask": torch.ones(1, dtype=torch.bool)})
            out = {}
            """
        )
        result["cache_startup"] = _child(
            cache_args
            + """
            import time
            from frameloom.cache import keys
            import frameloom.cache.index as index_mod
            import frameloom.cache.dataset as ds_mod
            from frameloom.cache.store import CacheStore
            calls = []
            real_identity = keys.file_identity
            def counted(path):
                calls.append(str(path))
                return real_identity(path)
            keys.file_identity = index_mod.file_identity = counted
            t0 = time.perf_counter()
            ds = ds_mod.CachedClipDataset(manifest, spec, codec_id, text_id, CacheStore(store_root))
            missing = ds.missing()
            item = ds[len(ds) - 1]
            seconds = time.perf_counter() - t0
            video_reads = [c for c in calls if c != manifest]
            out = {"startup_seconds": round(seconds, 2), "missing": len(missing), "index": ds.index is not None,
                   "file_identity_calls": len(calls), "video_files_read": len(video_reads),
                   "video_bytes_read": 0 if not video_reads else None, "first_item_latent": list(item["latent"].shape)}
            """
        )
        result["targets"] = {
            "prepare": "<= 120 s, <= 4 GiB", "convert": "<= 120 s, <= 4 GiB each",
            "cache_startup": "<= 30 s, <= 4 GiB, 0 video bytes",
        }  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
