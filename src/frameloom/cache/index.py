"""The key index: a cache build's video keys, written once, so that training starts without reading videos.

A video entry's key names the file's content (``keys.file_identity``: size, mtime and its first and last MiB),
so computing the keys of a manifest reads 2 MiB of every distinct video: for 10 million clips, terabytes, on
every rank at every start. ``build_cache`` computes them anyway, while it encodes; it writes them here, and
``CachedClipDataset`` reads them back instead of touching the videos.

Layout: ``<cache root>/index/<run>/rank<r>-of-<w>.parquet``, one file per process of the build (rows
``r::w``), with columns ``row`` (int64), ``bucket`` (int32, -1 without a bucket policy), ``video``
(32-byte sha256, null when the row's file could not be read) and ``complete`` (its video entry and every
caption variant's text entry were in the store when the build finished). ``<run>`` (``run_key``) names
exactly what the keys depend on: the manifest file's identity, the clip spec, the codec, the text encoder,
the caption rules and the bucket policy's shapes and strides. A change to any of them is another run, so a
stale index is never read; a video changed after its build is not seen until ``frameloom cache`` runs again
(which recomputes every identity): the documented price of a start-up that reads no video.

Reading picks the newest complete set of parts (every rank of one build), sorts it by (row, bucket) and
answers lookups with a binary search over one int64 array: 10 million rows in a few hundred MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from frameloom.cache.keys import KEY_VERSION, file_identity

__all__ = ["INDEX_VERSION", "CacheIndex", "run_key", "write_index"]

INDEX_VERSION = "frameloom-index-v1"
KEY_BYTES = 32
_PART = re.compile(r"^rank(\d+)-of-(\d+)\.parquet$")
_BUCKET_SPAN = 1 << 20  # composite lookup key: row * span + (bucket + 1)


def _policy_fingerprint(policy: Any) -> dict[str, Any] | None:
    if policy is None:
        return None
    t = policy.table
    params = {k: getattr(policy, k, None) for k in ("fps_max", "frame_stride", "target_fps", "train_fps",
                                                      "speed_factor", "num_frames", "spread")}  # fmt: skip
    return {
        "name": policy.name,
        "names": list(t.names),
        "frames": np.asarray(t.num_frames).tolist(),
        "height": np.asarray(t.height).tolist(),
        "width": np.asarray(t.width).tolist(),
        "params": {k: v for k, v in params.items() if v is not None},
    }


def run_key(
    manifest_path: str | os.PathLike,
    spec: Any,
    codec_identity: str,
    text_identity: str,
    caption_rules: Any = None,
    policy: Any = None,
) -> str:
    """Hex sha256 of everything a build's keys depend on (the module doc); the index folder's name."""
    parts = {
        "version": [KEY_VERSION, INDEX_VERSION],
        "manifest": file_identity(manifest_path),
        "spec": spec.key(),
        "codec": codec_identity,
        "text": text_identity,
        "captions": repr(caption_rules),
        "policy": _policy_fingerprint(policy),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _key_bytes(keys: list[str | None]) -> pa.Array:
    return pa.array([None if k is None else bytes.fromhex(k) for k in keys], pa.binary(KEY_BYTES))


def write_index(
    root: str | os.PathLike,
    run: str,
    shard: tuple[int, int],
    rows: np.ndarray,
    buckets: np.ndarray,
    video_keys: list[str | None],
    complete: np.ndarray,
) -> Path:
    """Write one build process's part of the index (atomically: temp file, then rename)."""
    rank, world = shard
    folder = Path(root) / "index" / run
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "row": pa.array(np.asarray(rows, np.int64)),
            "bucket": pa.array(np.asarray(buckets, np.int32)),
            "video": _key_bytes(video_keys),
            "complete": pa.array(np.asarray(complete, bool)),
        }
    )
    final = folder / f"rank{rank:05d}-of-{world:05d}.parquet"
    tmp = folder / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


@dataclass
class CacheIndex:
    """A loaded index: ``composite`` (sorted int64 row * span + bucket + 1), the key bytes (M, 32) and the
    completeness flags, in that order."""

    composite: np.ndarray
    video: np.ndarray
    has_video: np.ndarray
    complete: np.ndarray
    path: Path

    @classmethod
    def load(cls, root: str | os.PathLike, run: str) -> CacheIndex | None:
        """The newest complete set of parts of ``run`` under the store ``root``, or None."""
        folder = Path(root) / "index" / run
        if not folder.is_dir():
            return None
        sets: dict[int, dict[int, Path]] = {}
        for path in folder.iterdir():
            m = _PART.match(path.name)
            if m:
                sets.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
        complete_sets = [(w, parts) for w, parts in sets.items() if sorted(parts) == list(range(w))]
        if not complete_sets:
            return None
        world, parts = max(complete_sets, key=lambda wp: max(p.stat().st_mtime for p in wp[1].values()))
        try:
            table = pa.concat_tables([pq.read_table(parts[r]) for r in range(world)])
        except (pa.ArrowInvalid, OSError):
            return None
        composite = table.column("row").to_numpy().astype(np.int64) * _BUCKET_SPAN
        composite += table.column("bucket").to_numpy().astype(np.int64) + 1
        video_col = table.column("video").combine_chunks()
        has_video = np.asarray(pc.is_valid(video_col).to_numpy(zero_copy_only=False), bool)
        if video_col.null_count:
            video_col = pc.fill_null(video_col, pa.scalar(b"\0" * KEY_BYTES, pa.binary(KEY_BYTES)))
        raw = np.frombuffer(video_col.buffers()[1], np.uint8)[video_col.offset * KEY_BYTES :]
        video = raw[: len(video_col) * KEY_BYTES].reshape(-1, KEY_BYTES)
        complete = table.column("complete").to_numpy(zero_copy_only=False).astype(bool)
        del table
        if len(composite) > 1 and not (composite[1:] >= composite[:-1]).all():  # parts interleave rows
            order = np.argsort(composite, kind="stable")
            composite, video, has_video, complete = (
                composite[order],
                video[order],
                has_video[order],
                complete[order],
            )
        return cls(composite, video, has_video, complete, folder)

    def __len__(self) -> int:
        return len(self.composite)

    def positions(self, rows: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        """Index positions of (row, bucket) pairs, -1 where the pair is not in the index."""
        want = np.asarray(rows, np.int64) * _BUCKET_SPAN + (np.asarray(buckets, np.int64) + 1)
        pos = np.searchsorted(self.composite, want)
        pos = np.minimum(pos, max(len(self.composite) - 1, 0))
        found = (
            (len(self.composite) > 0) & (self.composite[pos] == want)
            if len(self.composite)
            else np.zeros(len(want), bool)
        )
        return np.where(found, pos, -1)

    def ready(self, rows: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        """Whether each pair is in the index with its entries complete."""
        want = np.asarray(rows, np.int64) * _BUCKET_SPAN + (np.asarray(buckets, np.int64) + 1)
        if len(want) == len(self.composite) and np.array_equal(want, self.composite):
            return self.complete & self.has_video  # the index holds exactly these pairs, in this order
        pos = self.positions(rows, buckets)
        ok = pos >= 0
        ok[ok] = self.complete[pos[ok]] & self.has_video[pos[ok]]
        return ok

    def video_key(self, row: int, bucket: int) -> str | None:
        """The video key of one pair (hex), or None."""
        pos = int(self.positions(np.array([row]), np.array([bucket]))[0])
        if pos < 0 or not self.has_video[pos]:
            return None
        return self.video[pos].tobytes().hex()
