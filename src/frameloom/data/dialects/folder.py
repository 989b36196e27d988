"""The folder dialect: a directory of videos and images, with captions beside them or in one table.

Samples are the files under the root (recursively) whose suffix is a video (mp4, mov, mkv, avi, webm, m4v)
or an image (png, jpg, jpeg, webp, bmp), plus any file a caption table lists. Hidden files and folders
(names starting with ".") are skipped. Captions, first match wins:

1. a sidecar ``.txt`` with the same stem in the same folder (``clips/a.mp4`` <- ``clips/a.txt``);
2. ``captions.csv`` (columns ``path``, ``text``, any others) or ``captions.jsonl`` (one
   ``{"path": ..., "text": ..., ...}`` per line) at the root, with paths relative to the root.

Columns of the caption table other than ``path``/``text`` (e.g. the synthetic set's ``color``/``shape``/
``direction``) are carried into the rows; they apply even when a sidecar supplies the text. A sample without
any caption keeps ``text`` "" (an unconditional sample). This module only lists files; it opens no media:
whether a file really is a video is the probe's question.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from frameloom.data.dialects.base import Entry, Listing, WriteResult, absolute, rebase, table_rows
from frameloom.data.probe import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from frameloom.errors import FrameloomError

MEDIA_SUFFIXES: frozenset[str] = VIDEO_SUFFIXES | IMAGE_SUFFIXES
CAPTION_TABLES: tuple[str, ...] = ("captions.csv", "captions.jsonl")


def _normalize(root: Path, listed: str) -> str:
    """A caption table's path as the key the scan uses: POSIX, relative to the root when inside it."""
    p = Path(str(listed).replace("\\", "/"))
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return str(p)  # outside the root: kept absolute
    return PurePosixPath(os.path.normpath(p.as_posix())).as_posix()


def _decode_cell(value: Any) -> Any:
    """CSV cells hold lists (e.g. ``crop``) as JSON text, as the manifest's CSV form does."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        # Let Arrow infer numeric columns (aesthetic scores...), but path and text are always text.
        options = pacsv.ConvertOptions(column_types={"path": pa.string(), "text": pa.string()})
        table = pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FrameloomError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if "path" not in table.column_names:
        raise FrameloomError(f"{path} needs a 'path' column (has: {', '.join(table.column_names)})")
    return [{k: _decode_cell(v) for k, v in row.items()} for row in table.to_pylist()]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    entries = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FrameloomError(f"{path}, line {number}: not JSON ({exc.msg})") from None
            if not isinstance(entry, dict) or "path" not in entry:
                raise FrameloomError(f"{path}, line {number}: expected an object with a 'path' key")
            entries.append(entry)
    return entries


def read_caption_tables(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The root's ``captions.csv`` and ``captions.jsonl`` entries, keyed by normalized path.

    Each value holds ``text`` (may be None) and the table's other columns. A path listed twice is an error:
    silently keeping one caption of two would hide a data problem.
    """
    root = Path(root)
    table: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for name, reader in (("captions.csv", _read_csv), ("captions.jsonl", _read_jsonl)):
        path = root / name
        if not path.is_file():
            continue
        for entry in reader(path):
            key = _normalize(root, entry["path"])
            if key in table:
                raise FrameloomError(f"{key} has two captions ({where[key]} and {name}); keep one")
            table[key] = {k: v for k, v in entry.items() if k != "path"}
            where[key] = name
    return table


def _scan(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in MEDIA_SUFFIXES:
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return found


def _sidecar_text(file: Path) -> str | None:
    sidecar = file.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return None


def read_folder(root: str | os.PathLike) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """List a folder's samples with their captions.

    Returns (rows, rejects). Each row has ``path`` (POSIX, relative to ``root``; absolute for a caption-table
    entry outside it), ``text`` ("" when uncaptioned) and the caption table's extra columns; rows are sorted
    by path. Rejects are ``(path, "missing")`` for caption-table entries whose file does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise FrameloomError(f"not a folder: {root}")
    captions = read_caption_tables(root)
    rejects: list[tuple[str, str]] = []
    paths = set(_scan(root))
    for listed in captions:
        if listed in paths:
            continue
        file = Path(listed) if Path(listed).is_absolute() else root / listed
        if file.is_file():
            paths.add(listed)  # listed explicitly: a sample whatever its suffix; the probe decides
        else:
            rejects.append((listed, "missing"))
    rows = []
    for rel in sorted(paths):
        file = Path(rel) if Path(rel).is_absolute() else root / rel
        entry = captions.get(rel, {})
        text = _sidecar_text(file)
        if text is None:
            text = entry.get("text")
        rows.append({**entry, "path": rel, "text": "" if text is None else str(text)})
    return rows, rejects


def list_folder(root: str | os.PathLike) -> Listing:
    """``read_folder`` as a dialect ``Listing`` (entries relative to ``root``; missing files as rejects)."""
    root = Path(root)
    rows, missing = read_folder(root)
    entries = [
        Entry(root=root, path=r["path"], fields={k: v for k, v in r.items() if k != "path"}) for r in rows
    ]
    rejects = [
        (str(absolute(root, p)), reason, "listed in a caption table, no such file") for p, reason in missing
    ]
    return Listing(entries, rejects)


def write_folder(table: pa.Table, out: str | os.PathLike, *, base: str | os.PathLike) -> WriteResult:
    """Write ``captions.jsonl`` into the folder ``out``: one object per row with ``path`` (relative to ``out``
    when the media lie under it, else absolute), ``text`` and the row's other columns (``aspect_ratio`` and
    ``resolution`` are left out: they follow from height and width). Media under ``out`` that the table
    does not list still count as samples when the folder is read (uncaptioned)."""
    out, base = Path(out), Path(base)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "captions.csv").exists():
        raise FrameloomError(
            f"{out / 'captions.csv'} exists; a folder keeps one caption table, remove it first"
        )
    lines = []
    for row in table_rows(table, base):
        row = rebase(row, out)
        record = {"path": row.pop("path"), "text": row.pop("text", "") or ""}
        record.update({k: v for k, v in row.items() if k not in ("aspect_ratio", "resolution")})
        lines.append(json.dumps(record, ensure_ascii=False))
    file = out / "captions.jsonl"
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(tmp, file)
    return WriteResult([file], len(lines))


__all__ = [
    "CAPTION_TABLES",
    "MEDIA_SUFFIXES",
    "list_folder",
    "read_caption_tables",
    "read_folder",
    "write_folder",
]
