"""``frameloom prepare``: read a source, probe every file, write the canonical manifest and a reject report.

The source is read by a dialect (today: the folder dialect) into rows of ``path``/``text``/extra columns;
``probe_many`` measures each file; the manifest gets the probe's measurements plus the dialect's columns, and
``rejected.csv`` (``path``, ``reason``, ``detail``) beside it lists every file left out and why.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frameloom.data.dialects.folder import read_folder
from frameloom.data.manifest import from_rows, write_manifest
from frameloom.data.probe import REASONS, probe_many
from frameloom.errors import FrameloomError

FORMATS: tuple[str, ...] = ("auto", "folder", "opensora", "opensora-plan", "cogvideox", "pyramid")
# Seed-system formats the command line already names; their readers arrive with the dialects issue.
_PENDING_FORMATS = frozenset({"opensora", "opensora-plan", "cogvideox", "pyramid"})

# Columns the probe measures: a caption table's values for them are ignored, the file is the truth.
_MEASURED = (
    "num_frames",
    "height",
    "width",
    "fps",
    "aspect_ratio",
    "resolution",
    "codec",
    "rotation",
    "duration",
    "is_image",
)

REJECTED_CSV = "rejected.csv"


@dataclass
class PrepareSummary:
    """What ``prepare`` did: counts, time, and where it wrote."""

    kept: int
    rejected: dict[str, int]
    seconds: float
    manifest: Path
    rejected_csv: Path
    uncaptioned: int = 0

    def line(self) -> str:
        """One line for the terminal, e.g. "kept 12, rejected 3 (empty: 1, not_media: 2) in 1.4 s"."""
        kept = f"kept {self.kept}"
        if self.uncaptioned:
            kept += f" ({self.uncaptioned} without caption)"
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
        if source.is_dir():
            return "folder"
        raise FrameloomError(
            f"{source} is a file; reading seed dataset files (--format opensora, opensora-plan, cogvideox, "
            "pyramid) arrives with the dialects issue. Pass a folder of videos for now."
        )
    if fmt in _PENDING_FORMATS:
        raise FrameloomError(f"--format {fmt} arrives with the dialects issue; use --format folder for now")
    if not source.is_dir():
        raise FrameloomError(f"--format folder needs a folder, but {source} is a file")
    return fmt


def _manifest_path(file: Path, manifest_dir: Path) -> str:
    """Relative to the manifest's folder when the file lies inside it (the pair can move together),
    absolute otherwise (a ``../..`` path would break as soon as the manifest alone moves)."""
    try:
        return file.relative_to(manifest_dir).as_posix()
    except ValueError:
        return str(file)


def _write_rejects(path: Path, rejects: list[tuple[str, str, str]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    writer.writerows(rejects)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "auto",
    workers: int = 1,
    progress: bool = True,
) -> PrepareSummary:
    """Build the manifest ``out`` (``.parquet``, or ``.csv``; a folder gets ``manifest.parquet``) from
    ``source``, probing with ``workers`` processes. ``rejected.csv`` is written beside the manifest.

    Paths in the manifest are relative to its folder when the media lie inside it, else absolute.
    Raises ``FrameloomError`` for a missing source or a format that cannot be read yet.
    """
    start = time.perf_counter()
    source = Path(source)
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / "manifest.parquet"
    _resolve_format(source, fmt)
    if workers < 1:
        raise FrameloomError(f"--workers must be at least 1, got {workers}")

    listed, folder_rejects = read_folder(source)
    root = source.resolve()
    manifest_dir = out.parent.resolve()

    def absolute(rel: str) -> Path:
        return Path(rel) if Path(rel).is_absolute() else root / rel

    by_file = {str(absolute(r["path"])): r for r in listed}
    good, probe_rejects = probe_many(list(by_file), workers=workers, progress=progress)

    rows: list[dict[str, Any]] = []
    for probed in good:
        file = probed["path"]
        carried = {k: v for k, v in by_file[file].items() if k not in _MEASURED}
        measured = {k: v for k, v in probed.items() if k != "path"}
        rows.append({**carried, **measured, "path": _manifest_path(Path(file), manifest_dir)})

    rejects = [
        (_manifest_path(absolute(p), manifest_dir), reason, "listed in a caption table, no such file")
        for p, reason in folder_rejects
    ]
    rejects += [
        (_manifest_path(Path(p), manifest_dir), reason, detail) for p, reason, detail in probe_rejects
    ]

    write_manifest(from_rows(rows), out)
    rejected_csv = _write_rejects(out.parent / REJECTED_CSV, rejects)
    return PrepareSummary(
        kept=len(rows),
        rejected=dict(Counter(reason for _, reason, _ in rejects)),
        seconds=time.perf_counter() - start,
        manifest=out,
        rejected_csv=rejected_csv,
        uncaptioned=sum(1 for r in rows if not r["text"]),
    )
