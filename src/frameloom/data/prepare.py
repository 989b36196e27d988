"""``frameloom prepare``: read a source, check and probe every file, write the manifest and a reject report.

Steps, part by part (a dialect streams a large source in parts of a few hundred thousand rows, as columns):

1. a dialect (``data/dialects``) lists the source's entries: path, root, and the columns the source gives,
   typed (a cell of the wrong type is one error naming file, row and column);
2. each path is checked against its root (``data/paths.py``; one ``scandir`` per folder): a relative path
   that leads outside it, by ``..`` or a symlink, an absolute path outside a root the format defines, or
   any absolute path outside the roots under ``strict_roots``, is rejected as ``outside_root`` unless it lies
   under an allowed extra root; a file that does not exist is ``missing``;
3. every file is probed once (``probe_many``), however many entries name it (scene cuts of one video),
   unless its metadata is trusted (below);
4. the manifest gets the dialect's columns plus the probe's measurements, written slice by slice, and
   ``rejected.csv`` (``path``, ``reason``, ``detail``) beside it lists every entry left out and why.

Given metadata versus probing: the probe's measurements (frames, size, fps, rotation, codec, ...) replace
the values a dataset file gives, because the file is what training decodes: a stale or rounded
``num_frames`` in a CSV would otherwise fail mid-run or shift every frame. The summary counts the rows whose
given values were wrong. ``trust_metadata=True`` (``--trust-metadata``) does what the seeds do instead: an
entry that gives num_frames, height, width (and fps, for a video) is not probed, only checked to exist; such
an entry whose values cannot be right (a frame count or size below 1, an fps that is NaN, infinite or not
positive) is rejected as ``bad_metadata``. For a data set of millions of already-measured clips, probing is
the slow part; trusted parts go through as columns (10 million rows in about a minute).

An entry whose media file is gone but that names a pre-extracted ``latent`` file (Pyramid Flow's jsonl: the
seed trains from the latent alone) is kept when the latent can be read, its frame count and size taken from
the latent's shape through the format's VAE (``Part.latent_geometry``), and counted in the summary.

Files found by looking at a folder that are not media are not entries: they are counted in the summary as
ignored, by reason. ``prepare`` that keeps no row at all raises ``NothingKept`` (exit 2) with the reject
summary and the likely fix, after writing ``rejected.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from frameloom.data.dialects import CLASS_DIALECTS, DIALECTS, detect_format, read_dialect
from frameloom.data.dialects.base import BAD_ENTRY, MEASURED, PATH_FIELDS, Part
from frameloom.data.manifest import REQUIRED, SCHEMA_TYPES, ManifestWriter
from frameloom.data.paths import (
    BAD,
    MISSING,
    NOT_FILE,
    OUTSIDE,
    OUTSIDE_ROOT,
    FolderIndex,
    PathRules,
    check_batch,
)
from frameloom.data.probe import IMAGE_SUFFIXES, REASONS, probe_many
from frameloom.errors import FrameloomError

FORMATS: tuple[str, ...] = ("auto", *DIALECTS, *CLASS_DIALECTS)

REJECTED_CSV = "rejected.csv"

BAD_CUT = "bad_cut"
"""Reject reason: ``cut_start``/``cut_end`` not a non-empty range inside the video."""
BAD_CROP = "bad_crop"
"""Reject reason: ``crop`` not a non-empty region inside the frame."""
BAD_METADATA = "bad_metadata"
"""Reject reason (``--trust-metadata``): a given frame count, size or frame rate that cannot be right."""

# Given values may differ from the probe's by this much before a row counts as corrected (fps is rounded
# to 3 decimals by Open-Sora's tools).
_FPS_TOLERANCE = 1e-3
_IMAGE_PATTERN = r"(?i)\.(" + "|".join(s[1:] for s in sorted(IMAGE_SUFFIXES)) + r")$"
# The likely fix for a run that kept nothing, by the most common reason.
_HINTS = {
    OUTSIDE_ROOT: "the entries lead outside their root: allow the folder with --allow-root DIR "
    "(or data.extra_roots), or fix the paths",
    "missing": "no listed file exists: relative paths are taken from the dataset file's folder "
    "(or its DATA_ROOT); check they point at the media",
    "not_media": "the files are not videos or images FFmpeg can read",
    "undecodable": "the files are damaged or cut short; check the copy",
    "bad_metadata": "the given metadata cannot be right; prepare without --trust-metadata probes the files",
    "bad_entry": "the records name no file",
}


@dataclass
class PrepareSummary:
    """What ``prepare`` did: counts, time, and where it wrote."""

    kept: int
    rejected: dict[str, int]
    seconds: float
    manifest: Path
    rejected_csv: Path
    uncaptioned: int = 0
    corrected: int = 0
    fmt: str = "folder"
    ignored: dict[str, int] = field(default_factory=dict)
    from_latents: int = 0
    """Rows whose media file is gone, kept for their pre-extracted latent (sized from it)."""

    def line(self) -> str:
        """One line for the terminal, e.g. "kept 12, rejected 3 (empty: 1, not_media: 2) in 1.4 s"."""
        kept = f"kept {self.kept}"
        notes = []
        if self.uncaptioned:
            notes.append(f"{self.uncaptioned} without caption")
        if self.corrected:
            notes.append(f"{self.corrected} with metadata corrected by probing")
        if self.from_latents:
            notes.append(f"{self.from_latents} without their video, sized from their latent file")
        if notes:
            kept += " (" + ", ".join(notes) + ")"
        total = sum(self.rejected.values())
        rejected = f"rejected {total}"
        if total:
            known = [*REASONS, OUTSIDE_ROOT, "bad_entry", BAD_CUT, BAD_CROP, BAD_METADATA]
            order = [r for r in known if r in self.rejected] + sorted(set(self.rejected) - set(known))
            rejected += " (" + ", ".join(f"{r}: {self.rejected[r]}" for r in order) + ")"
        ignored = ""
        if self.ignored:
            shown = ", ".join(f"{r}: {n}" for r, n in sorted(self.ignored.items()))
            ignored = f", ignored {sum(self.ignored.values())} ({shown})"
        return f"{kept}, {rejected}{ignored} in {self.seconds:.1f} s"


class NothingKept(FrameloomError):
    """``prepare`` kept no row; ``summary`` says why (``rejected.csv`` is written)."""

    def __init__(self, summary: PrepareSummary):
        self.summary = summary
        reasons = Counter(summary.rejected)
        hint = ""
        if reasons:
            top = reasons.most_common(1)[0][0]
            hint = "; " + _HINTS.get(top, "see the details in rejected.csv")
        else:
            hint = "; the source lists no entries"
        super().__init__(
            f"no usable entry: {summary.line()}{hint} (every reject is listed in {summary.rejected_csv}); "
            "no manifest was written"
        )


def _resolve_format(source: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise FrameloomError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not source.exists():
        raise FrameloomError(f"source not found: {source}")
    if fmt == "auto":
        return detect_format(source)
    if fmt in ("folder", "cogvideox") and not source.is_dir():
        raise FrameloomError(f"--format {fmt} needs a folder, but {source} is a file")
    return fmt


def _write_rejects(path: Path, rejects: list[tuple[str, str, str]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    writer.writerows(rejects)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _mask(values: Any) -> np.ndarray:
    return np.asarray(values.to_numpy(zero_copy_only=False) if hasattr(values, "to_numpy") else values, bool)


def _filled(table: pa.Table, name: str, dtype: Any, fill: Any) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, fill, dtype)
    col = table.column(name)
    return (pc.fill_null(col, fill) if col.null_count else col).to_numpy().astype(dtype, copy=False)


def _valid(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(table.num_rows, bool)
    return _mask(pc.is_valid(table.column(name)))


def _is_image(table: pa.Table, files: pa.Array) -> np.ndarray:
    by_suffix = _mask(pc.fill_null(pc.match_substring_regex(files, _IMAGE_PATTERN), False))
    if "is_image" not in table.column_names:
        return by_suffix
    given = table.column("is_image")
    return np.where(_mask(pc.is_valid(given)), _filled(table, "is_image", bool, False), by_suffix)


def _bad_metadata(table: pa.Table, image: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(rows whose given metadata cannot be right, a detail per row) for trusted rows."""
    n = table.num_rows
    bad = np.zeros(n, bool)
    details = [""] * n
    for name in ("num_frames", "height", "width"):
        v = _filled(table, name, np.int64, 1)
        for i in np.flatnonzero((v < 1) & ~bad).tolist():
            bad[i], details[i] = True, f"{name} {int(v[i])} is not at least 1"
    fps = _filled(table, "fps", np.float64, 1.0)
    with np.errstate(invalid="ignore"):
        wrong = ~image & (~np.isfinite(fps) | (fps <= 0)) & ~bad
    for i in np.flatnonzero(wrong).tolist():
        bad[i], details[i] = True, f"fps {fps[i]} is not a frame rate"
    return bad, details


def _range_problems(table: pa.Table) -> list[tuple[int, str, str]]:
    """(row, reason, detail) for cuts and crops that do not fit the (measured or trusted) video."""
    n = table.num_rows
    out: list[tuple[int, str, str]] = []
    frames = _filled(table, "num_frames", np.int64, 0)
    has_cut = _valid(table, "cut_start") | _valid(table, "cut_end")
    if has_cut.any():
        start = _filled(table, "cut_start", np.int64, 0)
        end = np.where(_valid(table, "cut_end"), _filled(table, "cut_end", np.int64, 0), frames)
        bad = has_cut & ~((start >= 0) & (start < end) & (end <= frames))
        for i in np.flatnonzero(bad).tolist():
            out.append(
                (i, BAD_CUT, f"cut [{start[i]}, {end[i]}) is not inside the video's {frames[i]} frames")
            )
    if "crop" in table.column_names and table.column("crop").null_count < n:
        heights, widths = _filled(table, "height", np.int64, 0), _filled(table, "width", np.int64, 0)
        for i, crop in enumerate(table.column("crop").to_pylist()):
            if crop is None:
                continue
            if len(crop) != 4:
                out.append((i, BAD_CROP, f"crop {list(crop)} is not [x0, x1, y0, y1]"))
                continue
            x0, x1, y0, y1 = crop
            if not (0 <= x0 < x1 <= widths[i] and 0 <= y0 < y1 <= heights[i]):
                out.append(
                    (
                        i,
                        BAD_CROP,
                        f"crop {list(crop)} (x0, x1, y0, y1) is outside the {widths[i]}x{heights[i]} frame",
                    )
                )
    return out


def _relative(files: pa.Array, manifest_dir: str) -> pa.Array:
    """Absolute file paths as the manifest stores them: relative to its folder when inside it (nulls stay)."""
    prefix = manifest_dir.rstrip("/") + "/"
    inside = pc.fill_null(pc.starts_with(files, prefix), False)
    return pc.if_else(inside, pc.utf8_slice_codeunits(files, len(prefix)), files)


class _Run:
    """The state of one ``prepare``: rejects, counts, probe results shared across parts."""

    def __init__(self, rules: PathRules, manifest_dir: Path, trust: bool, workers: int, progress: bool):
        self.rules = rules
        self.manifest_dir = str(manifest_dir)
        self.trust = trust
        self.workers = workers
        self.progress = progress
        self.index = FolderIndex()
        self.rejects: list[tuple[str, str, str]] = []
        self.ignored: Counter = Counter()
        self.probed: dict[str, dict[str, Any] | tuple[str, str]] = {}
        self.corrected = 0
        self.uncaptioned = 0
        self.from_latents = 0  # rows whose media file is gone, sized from their latent file

    def reject(self, path: str, reason: str, detail: str) -> None:
        self.rejects.append((path, reason, detail))  # made relative to the manifest's folder at the end

    def part(self, part: Part, bound: bool) -> pa.Table | None:
        table = part.table
        n = table.num_rows
        if n == 0:
            return None
        candidate = part.candidate if part.candidate is not None else np.zeros(n, bool)
        keep = np.ones(n, bool)
        # 1. Paths: the entry's file, then the other path columns, against the rules (columnar).
        check = check_batch(part.root, table.column("path"), self.rules, bound=bound, index=self.index)
        file_arr = check.files
        # a missing media file whose pre-extracted latent is named: kept if that latent can be read (step 2)
        rescue = np.zeros(n, bool)
        if part.latent_geometry is not None and "latent" in table.column_names:
            rescue = (check.status == MISSING) & _valid(table, "latent")
        for i in np.flatnonzero((check.status != 0) & ~rescue).tolist():
            status, path = int(check.status[i]), file_arr[i].as_py() or str(table.column("path")[i])
            if status == OUTSIDE:
                self.reject(path, OUTSIDE_ROOT, check.details[i])
            elif status == MISSING:
                self.reject(path, "missing", f"listed in the source: {check.details[i]}")
            elif status == BAD:
                self.reject(repr(path), BAD_ENTRY, check.details[i])
            else:
                self.reject(path, "not_media", check.details[i])
        keep &= (check.status == 0) | rescue
        other_files: dict[str, pa.Array] = {}
        for name in PATH_FIELDS:
            if name not in table.column_names or table.column(name).null_count == n:
                continue
            values = table.column(name)
            present = np.flatnonzero(
                np.asarray(pc.is_valid(values).to_numpy(zero_copy_only=False), bool) & keep
            )
            sub = check_batch(
                part.root, values.take(pa.array(present)), self.rules, bound=bound, index=self.index
            )
            resolved: list[str | None] = [None] * n
            sub_files = sub.files.to_pylist()
            for j, i in enumerate(present.tolist()):
                status = int(sub.status[j])
                if status == OUTSIDE:
                    self.reject(file_arr[i].as_py(), OUTSIDE_ROOT, f"{name}: {sub.details[j]}")
                elif status in (MISSING, NOT_FILE):
                    self.reject(
                        file_arr[i].as_py(), "missing", f"{name} file not found: {sub_files[j] or values[i]}"
                    )
                else:
                    resolved[i] = sub_files[j]
                    continue
                keep[i] = False
            other_files[name] = pa.array(resolved, pa.string())
        image = _is_image(table, file_arr)
        # 2. Trusted rows (complete, sane metadata) go through; the others are probed.
        complete = _valid(table, "num_frames") & _valid(table, "height") & _valid(table, "width")
        complete &= _valid(table, "fps") | image
        trusted = keep & complete & ~candidate & ~rescue if self.trust else np.zeros(n, bool)
        if trusted.any():
            bad, details = _bad_metadata(table, image)
            for i in np.flatnonzero(trusted & bad).tolist():
                self.reject(file_arr[i].as_py(), BAD_METADATA, details[i])
            keep &= ~(trusted & bad)
            trusted &= ~bad
        rescued = keep & rescue
        if rescued.any():  # no file to probe: sized from the latent the row trains from
            table = self._sized_from_latents(
                table, rescued, other_files["latent"], part.latent_geometry, file_arr
            )
            keep &= ~rescue | rescued  # ``rescued`` lost the rows whose latent cannot be read
            trusted |= rescued
        to_probe = keep & ~trusted
        probe_files = {i: file_arr[i].as_py() for i in np.flatnonzero(to_probe).tolist()}
        self._probe(list(probe_files.values()))
        measured_rows: dict[int, dict[str, Any]] = {}
        for i, file in probe_files.items():
            result = self.probed[file]
            if isinstance(result, tuple):
                reason, detail = result
                if candidate[i] and reason in ("not_media", "no_video_stream"):
                    self.ignored["not_media"] += 1
                else:
                    self.reject(file, reason, detail)
                keep[i] = False
            else:
                measured_rows[i] = result
        # 3. Merge: the dialect's columns, the probe's measurements on top (trusted rows: their own).
        columns: dict[str, Any] = {}
        for name in table.column_names:
            if name == "path" or name in PATH_FIELDS:
                continue
            columns[name] = table.column(name)
        probed_idx = sorted(measured_rows)
        for name in MEASURED:
            if name in ("aspect_ratio", "resolution"):
                continue
            want = SCHEMA_TYPES[name]
            given = columns.get(name)
            if name == "is_image":
                col = pa.array(image)
            elif given is None:
                col = pa.nulls(n, want)
            else:
                col = given.cast(want) if given.type != want else given
                if isinstance(col, pa.ChunkedArray):
                    col = col.combine_chunks()
            if name == "fps":  # an image has no frame rate: 0
                col = pc.if_else(pc.and_(pc.is_null(col), pa.array(image)), pa.scalar(0.0), col)
            if (
                probed_idx
            ):  # the probe's measurements replace what the source gave (slow path: probing anyway)
                values = col.to_pylist()
                for i in probed_idx:
                    values[i] = measured_rows[i][name]
                col = pa.array(values, want)
            columns[name] = col
        self.corrected += sum(_differs(table, i, measured_rows[i]) for i in probed_idx)
        h = _filled(pa.table({"h": columns["height"]}), "h", np.int64, 0)
        w = _filled(pa.table({"w": columns["width"]}), "w", np.int64, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            columns["aspect_ratio"] = pa.array(np.where(w > 0, h / np.where(w > 0, w, 1), 0.0), pa.float64())
        columns["resolution"] = pa.array(h * w, pa.int64())
        columns["path"] = _relative(file_arr, self.manifest_dir)
        for name, resolved in other_files.items():
            columns[name] = _relative(resolved, self.manifest_dir)
        text = columns.get("text")
        columns["text"] = pc.fill_null(text, "") if text is not None else pa.array([""] * n, pa.string())
        order = list(REQUIRED) + [c for c in columns if c not in REQUIRED]
        out = pa.table({c: columns[c] for c in order if c in columns})
        # 4. Cuts and crops against the (measured) video.
        for i, reason, detail in _range_problems(out):
            if keep[i]:
                self.reject(file_arr[i].as_py(), reason, detail)
                keep[i] = False
        out = out.filter(pa.array(keep))
        self.uncaptioned += int(pc.sum(pc.equal(out.column("text"), "")).as_py() or 0)
        return out

    def _sized_from_latents(
        self,
        table: pa.Table,
        rows: np.ndarray,
        latents: pa.Array,
        geometry: Any,
        files: pa.Array,
    ) -> pa.Table:
        """``table`` with ``num_frames``/``height``/``width`` of ``rows`` (a boolean mask, updated in place: a
        latent that cannot be read clears its row, rejected) taken from their latent files' shapes."""
        from frameloom.data.precomputed import PrecomputedError, latent_from, load_tensor_file

        sizes: dict[int, tuple[int, int, int]] = {}
        for i in np.flatnonzero(rows).tolist():
            path = Path(latents[i].as_py())
            try:
                sizes[i] = geometry(tuple(latent_from(load_tensor_file(path), path).shape))
            except PrecomputedError as exc:
                self.reject(files[i].as_py(), "missing", f"no such file, and its latent is unusable: {exc}")
                rows[i] = False
        self.from_latents += len(sizes)
        for k, name in enumerate(("num_frames", "height", "width")):
            values = table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
            for i, size in sizes.items():
                values[i] = size[k]
            col = pa.array(values, pa.int64())
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, col)
            else:
                table = table.append_column(name, col)
        return table

    def _probe(self, files: list[str]) -> None:
        todo = list(dict.fromkeys(f for f in files if f not in self.probed))
        if not todo:
            return
        good, bad = probe_many(todo, workers=self.workers, progress=self.progress)
        for row in good:
            self.probed[row["path"]] = {k: v for k, v in row.items() if k != "path"}
        for path, reason, detail in bad:
            self.probed[path] = (reason, detail)


def _cut_row(table: pa.Table, i: int) -> bool:
    return "cut_end" in table.column_names and table.column("cut_end")[i].is_valid


def _differs(table: pa.Table, i: int, measured: dict[str, Any]) -> bool:
    """Whether the source's given values disagree with the probe (a cut row's num_frames is a minimum)."""
    for name in ("num_frames", "height", "width"):
        if name not in table.column_names:
            continue
        given = table.column(name)[i].as_py()
        if given is None:
            continue
        if name == "num_frames" and _cut_row(table, i):
            continue
        if int(given) != int(measured[name]):
            return True
    if "fps" in table.column_names:
        given = table.column("fps")[i].as_py()
        if (
            given is not None
            and math.isfinite(given)
            and abs(float(given) - float(measured["fps"])) > _FPS_TOLERANCE
        ):
            return True
    return False


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "auto",
    workers: int = 1,
    progress: bool = True,
    *,
    allow_pickle: bool = False,
    extra_roots: Iterable[str | os.PathLike] = (),
    trust_metadata: bool = False,
    strict_roots: bool = False,
) -> PrepareSummary:
    """Build the manifest ``out`` (``.parquet``, or ``.csv``; a folder gets ``manifest.parquet``) from
    ``source`` read as ``fmt`` (``auto``: detected), probing with ``workers`` processes. ``rejected.csv``
    is written beside the manifest.

    ``extra_roots``: folders besides each entry's root that its files may lie in. ``strict_roots``: absolute
    paths must lie under a root in every format (``data/paths.py``). ``allow_pickle``: read Open-Sora-Plan
    pickle annotations (a pickle can run code). ``trust_metadata``: see the module doc. Paths in the manifest
    are relative to its folder when the media lie inside it, else absolute. Raises ``FrameloomError`` for a
    missing or unreadable source, and ``NothingKept`` when no entry is usable.
    """
    start = time.perf_counter()
    source = Path(source)
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / "manifest.parquet"
    fmt = _resolve_format(source, fmt)
    if workers < 1:
        raise FrameloomError(f"--workers must be at least 1, got {workers}")
    extra = [Path(r) for r in extra_roots]
    for root in extra:
        if not root.is_dir():
            raise FrameloomError(f"allowed root is not a folder: {root}")
    rules = PathRules.make(extra, strict_roots)
    listing = read_dialect(fmt, source, allow_pickle=allow_pickle, rules=rules)
    manifest_dir = out.parent.resolve()
    # fast-DiT features are tensor files, not media: their listed sizes are the only ones there are
    run = _Run(rules, manifest_dir, trust_metadata or fmt == "fastdit", workers, progress)
    writer = ManifestWriter(out)
    rows = tqdm(desc="prepare", unit="row", disable=not progress)
    try:
        for part in listing.parts:
            table = run.part(part, listing.bound or rules.strict)
            rows.update(part.table.num_rows)
            if table is not None and table.num_rows:
                writer.write(table)
    except BaseException:
        writer.abort()
        raise
    finally:
        rows.close()
    prefix = str(manifest_dir).rstrip("/") + "/"
    rejects = [
        (p[len(prefix) :] if p.startswith(prefix) else p, r, d)
        for p, r, d in [*listing.rejects, *run.rejects]
    ]
    rejected_csv = _write_rejects(out.parent / REJECTED_CSV, rejects)
    summary = PrepareSummary(
        kept=writer.rows,
        rejected=dict(Counter(reason for _, reason, _ in rejects)),
        seconds=time.perf_counter() - start,
        manifest=out,
        rejected_csv=rejected_csv,
        uncaptioned=run.uncaptioned,
        corrected=run.corrected,
        from_latents=run.from_latents,
        fmt=fmt,
        ignored=dict(listing.ignored + run.ignored),
    )
    if writer.rows == 0:
        writer.abort()
        raise NothingKept(summary)
    writer.close()
    return summary
