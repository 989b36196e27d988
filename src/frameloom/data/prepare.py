"""``frameloom prepare``: read a source, check and probe every file, write the manifest and a reject report.

Steps:

1. a dialect (``data/dialects``) lists the source's entries: path, root, and the columns the source gives;
2. each path is resolved against its root (``data/paths.py``): an entry that leads outside it, by ``..``,
   an absolute path or a symlink, is rejected as ``outside_root`` unless it lies under an allowed extra root;
3. every file is probed once (``probe_many``), however many entries name it (scene cuts of one video);
4. the manifest gets the dialect's columns plus the probe's measurements, and ``rejected.csv``
   (``path``, ``reason``, ``detail``) beside it lists every entry left out and why.

Given metadata versus probing: the probe's measurements (frames, size, fps, rotation, codec, ...) replace
the values a dataset file gives, because the file is what training decodes: a stale or rounded
``num_frames`` in a CSV would otherwise fail mid-run or shift every frame. The summary counts the rows whose
given values were wrong. ``trust_metadata=True`` (``--trust-metadata``) does what the seeds do instead: an
entry that gives num_frames, height, width (and fps, for a video) is not probed, only checked to exist;
for a data set of millions of already-measured clips, probing is the slow part.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frameloom.data.dialects import CLASS_DIALECTS, DIALECTS, detect_format, read_dialect
from frameloom.data.dialects.base import MEASURED, PATH_FIELDS, Entry, absolute, relative_or_absolute
from frameloom.data.manifest import derived_columns, from_rows, write_manifest
from frameloom.data.paths import OUTSIDE_ROOT, OutsideRoot, resolve_entry
from frameloom.data.probe import IMAGE_SUFFIXES, REASONS, probe_many
from frameloom.errors import FrameloomError

FORMATS: tuple[str, ...] = ("auto", *DIALECTS, *CLASS_DIALECTS)

REJECTED_CSV = "rejected.csv"

BAD_CUT = "bad_cut"
"""Reject reason: ``cut_start``/``cut_end`` not a non-empty range inside the video."""
BAD_CROP = "bad_crop"
"""Reject reason: ``crop`` not a non-empty region inside the frame."""

# Given values may differ from the probe's by this much before a row counts as corrected (fps is rounded
# to 3 decimals by Open-Sora's tools).
_FPS_TOLERANCE = 1e-3


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

    def line(self) -> str:
        """One line for the terminal, e.g. "kept 12, rejected 3 (empty: 1, not_media: 2) in 1.4 s"."""
        kept = f"kept {self.kept}"
        notes = []
        if self.uncaptioned:
            notes.append(f"{self.uncaptioned} without caption")
        if self.corrected:
            notes.append(f"{self.corrected} with metadata corrected by probing")
        if notes:
            kept += " (" + ", ".join(notes) + ")"
        total = sum(self.rejected.values())
        rejected = f"rejected {total}"
        if total:
            order = [r for r in REASONS if r in self.rejected] + sorted(set(self.rejected) - set(REASONS))
            rejected += " (" + ", ".join(f"{r}: {self.rejected[r]}" for r in order) + ")"
        return f"{kept}, {rejected} in {self.seconds:.1f} s"


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


def _report_path(path: str, manifest_dir: Path) -> str:
    """A reject's path as the report shows it: relative to the manifest's folder when inside it."""
    return relative_or_absolute(Path(path), manifest_dir) if Path(path).is_absolute() else path


def _write_rejects(path: Path, rejects: list[tuple[str, str, str]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    writer.writerows(rejects)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _check_paths(
    entry: Entry, extra_roots: Sequence[Path]
) -> tuple[Path, dict[str, Any]] | tuple[None, tuple[str, str, str]]:
    """(file, fields with absolute path columns), or (None, reject)."""
    shown = str(absolute(entry.root, entry.path))
    try:
        file = resolve_entry(entry.root, entry.path, extra_roots)
    except OutsideRoot as exc:
        return None, (shown, OUTSIDE_ROOT, exc.detail)
    fields = dict(entry.fields)
    for name in PATH_FIELDS:
        if fields.get(name) is None:
            continue
        try:
            other = resolve_entry(entry.root, str(fields[name]), extra_roots)
        except OutsideRoot as exc:
            return None, (shown, OUTSIDE_ROOT, f"{name}: {exc.detail}")
        if not other.is_file():
            return None, (shown, "missing", f"{name} file not found: {other}")
        fields[name] = str(other)
    return file, fields


def _given_is_complete(file: Path, fields: dict[str, Any]) -> bool:
    if any(fields.get(k) is None for k in ("num_frames", "height", "width")):
        return False
    return fields.get("fps") is not None or file.suffix.lower() in IMAGE_SUFFIXES


def _differs(fields: dict[str, Any], measured: dict[str, Any]) -> bool:
    for name in ("num_frames", "height", "width"):
        if fields.get(name) is not None and int(fields[name]) != int(measured[name]):
            return True
    given_fps = fields.get("fps")
    return given_fps is not None and abs(float(given_fps) - float(measured["fps"])) > _FPS_TOLERANCE


def _range_problem(row: dict[str, Any]) -> tuple[str, str] | None:
    """A cut or crop that does not fit the (measured) video, as (reason, detail)."""
    if row.get("cut_start") is not None or row.get("cut_end") is not None:
        start = int(row.get("cut_start") or 0)
        end = int(row["cut_end"]) if row.get("cut_end") is not None else int(row["num_frames"])
        if not 0 <= start < end <= int(row["num_frames"]):
            return BAD_CUT, f"cut [{start}, {end}) is not inside the video's {row['num_frames']} frames"
    crop = row.get("crop")
    if crop is not None:
        if len(crop) != 4:
            return BAD_CROP, f"crop {list(crop)} is not [x0, x1, y0, y1]"
        x0, x1, y0, y1 = (int(v) for v in crop)
        w, h = int(row["width"]), int(row["height"])
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            return BAD_CROP, f"crop {list(crop)} (x0, x1, y0, y1) is outside the {w}x{h} frame"
    return None


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
) -> PrepareSummary:
    """Build the manifest ``out`` (``.parquet``, or ``.csv``; a folder gets ``manifest.parquet``) from
    ``source`` read as ``fmt`` (``auto``: detected), probing with ``workers`` processes. ``rejected.csv``
    is written beside the manifest.

    ``extra_roots``: folders besides each entry's root that its files may lie in. ``allow_pickle``: read
    Open-Sora-Plan pickle annotations (a pickle can run code). ``trust_metadata``: see the module doc.
    Paths in the manifest are relative to its folder when the media lie inside it, else absolute.
    Raises ``FrameloomError`` for a missing or unreadable source.
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

    listing = read_dialect(fmt, source, allow_pickle=allow_pickle)
    manifest_dir = out.parent.resolve()
    rejects: list[tuple[str, str, str]] = list(listing.rejects)

    # 1. Path safety, and which entries need a probe.
    checked: list[tuple[Path, dict[str, Any], bool]] = []  # (file, fields, trusted)
    for entry in listing.entries:
        file, result = _check_paths(entry, extra)
        if file is None:
            rejects.append(result)
            continue
        # fast-DiT features are tensor files, not media: their listed sizes are the only ones there are
        trusted = (trust_metadata or fmt == "fastdit") and _given_is_complete(file, result)
        if trusted and not file.is_file():
            rejects.append((str(file), "missing", "listed in the source, no such file"))
            continue
        checked.append((file, result, trusted))

    # 2. Probe each file once.
    to_probe = list(dict.fromkeys(str(f) for f, _, trusted in checked if not trusted))
    good, probe_rejects = probe_many(to_probe, workers=workers, progress=progress)
    probed = {row["path"]: row for row in good}
    failed = {path: (reason, detail) for path, reason, detail in probe_rejects}

    # 3. Merge: the dialect's columns, the probe's measurements on top.
    rows: list[dict[str, Any]] = []
    corrected = 0
    for file, fields, trusted in checked:
        key = str(file)
        if key in failed:
            rejects.append((key, *failed[key]))
            continue
        if trusted:
            row = {k: v for k, v in fields.items() if k not in ("aspect_ratio", "resolution")}
            row.setdefault("is_image", file.suffix.lower() in IMAGE_SUFFIXES)
            row.setdefault("fps", 0.0)
            row.update(derived_columns(int(row["height"]), int(row["width"])))
        else:
            measured = {k: v for k, v in probed[key].items() if k != "path"}
            corrected += _differs(fields, measured)
            row = {**{k: v for k, v in fields.items() if k not in MEASURED}, **measured}
        problem = _range_problem(row)
        if problem is not None:
            rejects.append((key, *problem))
            continue
        row["path"] = relative_or_absolute(file, manifest_dir)
        for name in PATH_FIELDS:
            if row.get(name) is not None:
                row[name] = relative_or_absolute(Path(row[name]), manifest_dir)
        row["text"] = "" if row.get("text") is None else str(row["text"])
        rows.append(row)

    rejects = [(_report_path(p, manifest_dir), reason, detail) for p, reason, detail in rejects]
    write_manifest(from_rows(rows), out)
    rejected_csv = _write_rejects(out.parent / REJECTED_CSV, rejects)
    return PrepareSummary(
        kept=len(rows),
        rejected=dict(Counter(reason for _, reason, _ in rejects)),
        seconds=time.perf_counter() - start,
        manifest=out,
        rejected_csv=rejected_csv,
        uncaptioned=sum(1 for r in rows if not r["text"]),
        corrected=corrected,
        fmt=fmt,
    )
