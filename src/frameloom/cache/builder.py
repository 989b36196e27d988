"""Fill the cache: encode every manifest row's clip and caption once, skipping what is already there.

Resumable by construction: an entry is written atomically as soon as its batch is encoded, and every row whose
key is already present is skipped, so re-running a killed ``build_cache`` continues where it stopped. With
``shard=(rank, world)`` each process takes rows ``rank::world`` (for ``torchrun``); processes never write the
same row, and a caption shared by rows of two ranks is at worst written twice with identical content.

Stored tensors:

- video: ``"latent"`` ``(C, t, h, w)`` (batch dim removed) in the dtype the codec produced (fp32 for fp32
  codecs, bf16 for a bf16 VAE): the cache then holds exactly what on-the-fly encoding would give, and a bf16
  codec halves the disk footprint. The trainer casts as it needs. ``"fps"`` ``(1,)`` float64: the rate of the
  clip's frames as sampled (``data.video.row_fps``, NaN when unknown; LTX-Video's RoPE time scale). Entries
  written before it existed lack it: the cached dataset then recomputes it from the manifest row and spec.
- text: ``"emb"`` ``(L, D)`` and ``"mask"`` ``(L,)`` (all True) trimmed to the caption's real token count, in
  the encoder's dtype; ``collate_text`` pads them back per batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from frameloom.cache.index import run_key, write_index
from frameloom.cache.keys import EXTRA_PREFIX, KEY_VERSION, row_video_key, text_key
from frameloom.cache.store import CacheStore
from frameloom.data import video as video_io  # looked up at call time: decode_clip may be patched in tests
from frameloom.data.buckets import BucketPolicy
from frameloom.data.captions import CaptionRules, caption_variants
from frameloom.data.manifest import iter_rows, load_manifest, resolve_path
from frameloom.data.paths import OUTSIDE_ROOT, OutsideRoot, PathRules, resolve_entry
from frameloom.data.video import ClipSpec, DecodeError
from frameloom.errors import FrameloomError
from frameloom.models.codecs import LatentCodec
from frameloom.models.text import TextEncoder

__all__ = ["CacheReport", "build_cache", "merge_reports"]


@dataclass
class CacheReport:
    """What one ``build_cache`` call did (for this process's shard).

    ``encoded``/``reused`` count video entries; ``failed`` lists ``(path, reason)`` for rows that could not be
    read or decoded; ``text_encoded``/``text_reused`` count distinct captions.
    """

    encoded: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    text_encoded: int = 0
    text_reused: int = 0

    def line(self) -> str:
        """One-line summary, e.g. ``cache: 10 clips encoded, 2 reused, 1 failed; 5 captions encoded, ...``."""
        return (
            f"cache: {self.encoded} clips encoded, {self.reused} reused, {len(self.failed)} failed; "
            f"{self.text_encoded} captions encoded, {self.text_reused} reused; {self.seconds:.1f}s"
        )


def merge_reports(reports: list[CacheReport]) -> CacheReport:
    """One report for the shards of all processes (counts summed, failures concatenated, slowest time)."""
    out = CacheReport()
    for r in reports:
        out.encoded += r.encoded
        out.reused += r.reused
        out.failed.extend(r.failed)
        out.text_encoded += r.text_encoded
        out.text_reused += r.text_reused
        out.seconds = max(out.seconds, r.seconds)
    return out


@dataclass
class _Pending:
    """Decoded clips of one shape waiting to be encoded together."""

    keys: list[str] = field(default_factory=list)
    clips: list[torch.Tensor] = field(default_factory=list)
    meta: list[dict[str, str]] = field(default_factory=list)
    fps: list[float] = field(default_factory=list)


def _flush(pending: _Pending, codec: LatentCodec, store: CacheStore) -> int:
    if not pending.clips:
        return 0
    video = torch.stack(pending.clips)  # (B, 3, T, H, W)
    with torch.no_grad():
        latents = codec.encode(video)  # (B, C, t, h, w)
    if latents.ndim != 5 or latents.shape[0] != len(pending.clips):
        raise RuntimeError(f"codec returned shape {tuple(latents.shape)} for a batch of {tuple(video.shape)}")
    for key, latent, meta, fps in zip(pending.keys, latents.detach().cpu(), pending.meta, pending.fps):
        store.put("video", key, {"latent": latent, "fps": torch.tensor([fps], dtype=torch.float64)}, meta)
    n = len(pending.clips)
    pending.keys.clear()
    pending.clips.clear()
    pending.meta.clear()
    pending.fps.clear()
    return n


def _cache_texts(
    texts: list[str],
    text_encoder: TextEncoder,
    store: CacheStore,
    batch_size: int,
    report: CacheReport,
    progress: bool,
) -> None:
    todo: list[tuple[str, str]] = []
    for text in dict.fromkeys(texts):  # distinct, in first-seen order
        key = text_key(text, text_encoder.identity)
        if store.has("text", key):
            report.text_reused += 1
        else:
            todo.append((text, key))
    bar = tqdm(total=len(todo), desc="cache captions", unit="caption", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        texts_chunk = [t for t, _ in chunk]
        with torch.no_grad():
            emb, mask = text_encoder.encode(texts_chunk)  # (B, L, D), (B, L)
            extras = text_encoder.encode_extras(texts_chunk)  # {name: (B, ...)}, e.g. a pooled vector
        emb, mask = emb.detach().cpu(), mask.detach().cpu().bool()
        extras = {name: value.detach().cpu() for name, value in extras.items()}
        for i, (text, key) in enumerate(chunk):
            real = mask[i]  # selecting by the mask works for left and right padding alike
            meta = {"kind": "text", "version": KEY_VERSION, "encoder": text_encoder.identity, "text": text}
            entry = {"emb": emb[i][real], "mask": mask[i][real]}
            entry.update({EXTRA_PREFIX + name: value[i] for name, value in extras.items()})
            store.put("text", key, entry, meta)
        report.text_encoded += len(chunk)
        bar.update(len(chunk))
    bar.close()


@dataclass
class _Work:
    """What this shard encodes: row indices, their buckets (-1: none), rows and clip specs, in work order."""

    index: list[int]
    bucket: list[int]
    rows: list[dict[str, Any]]
    specs: list[ClipSpec]


def _work_items(
    rows: list[dict[str, Any]],
    rank: int,
    world: int,
    spec: ClipSpec,
    spec_for_row: Callable[[dict[str, Any]], ClipSpec] | None,
    buckets: BucketPolicy | None,
) -> _Work:
    """The (row, clip spec) pairs this shard (rows ``rank::world``) encodes.

    With a bucket policy: one pair per reachable (row, bucket), ordered by the bucket's shape (stable, so
    manifest order within a shape): consecutive clips then share a shape and fill whole codec batches.
    """
    if buckets is None:
        idx = list(range(rank, len(rows), world))
        specs = [spec_for_row(rows[i]) if spec_for_row is not None else spec for i in idx]
        return _Work(idx, [-1] * len(idx), [rows[i] for i in idx], specs)
    if len(buckets.cols) != len(rows):
        raise ValueError(f"the bucket policy covers {len(buckets.cols)} rows, the manifest has {len(rows)}")
    pair_rows, pair_buckets = buckets.reachable()  # (P,), (P,)
    mine = pair_rows % world == rank
    pair_rows, pair_buckets = pair_rows[mine], pair_buckets[mine]
    table = buckets.table
    # lexsort: the last key is the primary one; stable, so rows stay in manifest order within a shape
    order = np.lexsort((pair_rows, table.width[pair_buckets], table.height[pair_buckets],
                        table.num_frames[pair_buckets]))  # fmt: skip
    idx, bks = pair_rows[order].tolist(), pair_buckets[order].tolist()
    specs = [buckets.clip_spec(spec, rows[i].get("fps"), b) for i, b in zip(idx, bks)]
    return _Work(idx, bks, [rows[i] for i in idx], specs)


def build_cache(
    manifest_path: str | os.PathLike,
    *,
    spec: ClipSpec,
    codec: LatentCodec,
    text_encoder: TextEncoder,
    store: CacheStore,
    batch_size: int = 8,
    progress: bool = True,
    empty_prompt: bool = True,
    shard: tuple[int, int] = (0, 1),
    spec_for_row: Callable[[dict[str, Any]], ClipSpec] | None = None,
    buckets: BucketPolicy | None = None,
    caption_rules: CaptionRules | None = None,
    rules: PathRules | None = None,
    write_key_index: bool = True,
) -> CacheReport:
    """Encode the latents and caption embeddings of a manifest's rows that are not cached yet.

    ``spec_for_row`` gives a row its own clip spec; otherwise every row uses ``spec``. With ``buckets`` (a
    bucket policy bound to this manifest's columns) a row is encoded once per bucket it can land in, in
    any epoch (``BucketPolicy.reachable``), at that bucket's spec (``policy.clip_spec(spec, fps, bucket)``);
    rows no epoch puts in a bucket are not encoded, as training never reads them. ``caption_rules`` are
    applied to every caption (``keys.caption``) with the row's spec; they must give one text per row
    (not the ``random`` aesthetic mode).

    Clips are encoded in batches of up to ``batch_size`` consecutive clips of equal shape (with ``buckets``,
    the work is ordered by shape first). Rows whose file is missing or fails to decode (``DecodeError``) are
    listed in ``report.failed``; any other error (e.g. in the codec) propagates, and everything stored
    before it stays valid for the next run. The empty prompt ``""`` is always cached too (by rank 0) when
    ``empty_prompt``, for caption dropout and classifier-free guidance.
    """
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if buckets is not None and spec_for_row is not None:
        raise ValueError("give spec_for_row or buckets, not both")
    if caption_rules is not None and caption_rules.per_epoch:
        raise FrameloomError(
            "data.caption_aesthetic=random draws a phrase per epoch: one cached caption per row cannot hold "
            "it (training encodes such captions on the fly)"
        )
    started = time.perf_counter()
    report = CacheReport()
    manifest_path = Path(manifest_path)
    root = manifest_path.resolve().parent
    rules = rules or PathRules()
    all_rows = list(iter_rows(load_manifest(manifest_path, rules)))
    work = _work_items(all_rows, rank, world, spec, spec_for_row, buckets)
    store.cleanup_temp()  # temp files of killed runs on this host (or old ones) are never read; drop them

    # 1. Video latents, in manifest order (by bucket shape first, with buckets), batched by shape.
    file_ids: dict[str, str] = {}
    seen: set[str] = set()  # keys written (or queued) by this run: duplicates count as reused
    keys: list[str | None] = [None] * len(work.rows)
    ok = np.zeros(len(work.rows), bool)
    pending = _Pending()
    pending_shape: tuple[int, ...] | None = None
    bar = tqdm(total=len(work.rows), desc="cache clips", unit="clip", disable=not progress)
    for w, (row, row_spec) in enumerate(zip(work.rows, work.specs)):
        bar.update(1)
        path = str(resolve_path(manifest_path, row["path"]))
        try:  # the file that would be opened, symlinks followed, must stay inside its root (data/paths.py)
            resolve_entry(root, str(row["path"]), rules.extra_roots, bound=rules.strict)
        except OutsideRoot as exc:
            report.failed.append((path, f"{OUTSIDE_ROOT}: {exc.detail}"))
            continue
        try:
            key = row_video_key(row, manifest_path, row_spec, codec.identity, file_ids)
        except OSError as exc:
            report.failed.append((path, f"cannot read file: {exc.strerror or exc}"))
            continue
        keys[w] = key
        if key in seen or store.has("video", key):
            report.reused += 1
            ok[w] = True
            continue
        try:
            clip = video_io.decode_clip(row, row_spec, root=root, output="float")  # (3, T, H, W) in [-1, 1]
        except DecodeError as exc:
            report.failed.append((path, exc.reason))
            continue
        seen.add(key)
        ok[w] = True
        shape = tuple(clip.shape)
        if pending_shape is not None and shape != pending_shape:
            report.encoded += _flush(pending, codec, store)
        pending_shape = shape
        pending.keys.append(key)
        pending.clips.append(clip)
        pending.fps.append(video_io.row_fps_or_nan(row, row_spec))
        pending.meta.append(
            {"kind": "video", "version": KEY_VERSION, "path": str(row["path"]), "spec": row_spec.key(),
             "codec": codec.identity}
        )  # fmt: skip
        if len(pending.clips) >= batch_size:
            report.encoded += _flush(pending, codec, store)
    report.encoded += _flush(pending, codec, store)
    bar.close()

    # 2. Caption embeddings (plus "" once, on rank 0). The empty prompt is encoded in a batch of its own, as the
    # trainer and sampler encode it: its embedding then does not depend on which captions shared its batch
    # (ulp-level differences otherwise), so the cache is the same for any number of processes. Every caption
    # a row can be trained with is cached (all of them under caption_choice: random).
    texts = [
        t
        for row, row_spec in zip(work.rows, work.specs)
        for t in caption_variants(row, caption_rules, row_spec)
    ]
    if (empty_prompt and rank == 0) or "" in texts:
        _cache_texts([""], text_encoder, store, batch_size, report, progress)
    _cache_texts([t for t in texts if t != ""], text_encoder, store, batch_size, report, progress)

    # 3. The key index of this shard, so that training finds its entries without reading a video.
    if write_key_index and spec_for_row is None:
        run = run_key(manifest_path, spec, codec.identity, text_encoder.identity, caption_rules, buckets)
        write_index(store.root, run, shard, np.array(work.index), np.array(work.bucket), keys, ok)

    report.seconds = time.perf_counter() - started
    return report
