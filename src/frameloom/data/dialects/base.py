"""What every dialect shares: the entries a reader lists, and the path handling of readers and writers.

A reader maps a seed system's dataset files into ``Entry`` objects: the path as the file writes it, the
root it is relative to, and the canonical manifest columns the file gives (DESIGN.md, "Canonical
manifest"). ``prepare`` resolves each path safely against its root (``data/paths.py``), probes what is
missing and writes the manifest. A writer takes a manifest table (paths relative to ``base``, the manifest's
folder, or absolute) and writes the dialect's files with paths relative to the dialect's own root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from frameloom.data.manifest import from_rows

PATH_FIELDS: tuple[str, ...] = ("latent", "text_fea", "condition_image")
"""Columns besides ``path`` that hold file paths (relative to the same root as ``path``)."""

MEASURED: tuple[str, ...] = (
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
"""Columns the probe measures from the file itself."""

BAD_ENTRY = "bad_entry"
"""Reject reason: a record a reader cannot use (no path, wrong types)."""


@dataclass
class Entry:
    """One sample as a dialect lists it: ``path`` as written, relative to ``root`` unless absolute."""

    root: Path
    path: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Listing:
    """A reader's result: the entries in file order and the records it could not use.

    ``rejects`` are ``(path, reason, detail)``; ``path`` is absolute where the record had one.
    """

    entries: list[Entry]
    rejects: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class WriteResult:
    """What a writer wrote: the files, how many rows, and notes for the user (rows left out and why)."""

    files: list[Path]
    rows: int
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for the terminal."""
        text = f"wrote {self.rows} rows to {', '.join(str(f) for f in self.files)}"
        return text + "".join(f"; {n}" for n in self.notes)


def absolute(root: Path, path: str) -> Path:
    """``path`` taken from ``root`` unless absolute, normalised (no symlinks resolved)."""
    p = Path(str(path)).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else Path(root).absolute() / p))


def relative_or_absolute(file: Path, root: Path) -> str:
    """POSIX path relative to ``root`` when ``file`` lies under it (the pair can move together), else the
    absolute path (a ``../..`` path would break as soon as one of them moves, and reads as an escape)."""
    file, root = Path(os.path.abspath(file)), Path(os.path.abspath(root))
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return str(file)


def table_rows(table: pa.Table, base: Path, batch_rows: int = 65536) -> Iterator[dict[str, Any]]:
    """A manifest's rows with ``path`` and the path columns made absolute (relative ones are from
    ``base``), ``None`` cells dropped. Batch by batch, so a large manifest is never all Python objects."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        for row in batch.to_pylist():
            row = {k: v for k, v in row.items() if v is not None}
            for name in ("path", *PATH_FIELDS):
                if name in row:
                    row[name] = str(absolute(base, row[name]))
            yield row


def rebase(row: dict[str, Any], root: Path) -> dict[str, Any]:
    """``table_rows`` output with its paths written for a dialect rooted at ``root``."""
    out = dict(row)
    for name in ("path", *PATH_FIELDS):
        if name in out:
            out[name] = relative_or_absolute(Path(out[name]), root)
    return out


def entries_to_table(listing: Listing, manifest_dir: Path) -> pa.Table:
    """Entries as a manifest table without probing (every entry must give num_frames, height, width):
    paths relative to ``manifest_dir`` when inside it, else absolute."""
    rows = []
    for entry in listing.entries:
        row = dict(entry.fields)
        row["path"] = relative_or_absolute(absolute(entry.root, entry.path), manifest_dir)
        for name in PATH_FIELDS:
            if row.get(name) is not None:
                row[name] = relative_or_absolute(absolute(entry.root, row[name]), manifest_dir)
        row.setdefault("text", "")
        rows.append(row)
    return from_rows(rows)


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-empty line of a JSON-lines file."""
    from frameloom.errors import FrameloomError

    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise FrameloomError(f"{path}, line {number}: not JSON ({exc.msg})") from None


def one_line(text: Any) -> str:
    """A caption on one line (line-based formats cannot hold a newline)."""
    return " ".join(str(text or "").split("\n")).replace("\r", " ")
