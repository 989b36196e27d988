"""The folder dialect: a directory of videos and images, with captions beside them or in one table.

Every regular file under the root (recursively; hidden names skipped and counted) is one of:

- a sample: a video or image suffix (``data/probe.py``: mp4, mov, mkv, avi, webm, m4v, ogv, mpg, ts, m2ts,
  flv, wmv, asf, 3gp, mxf, y4m, ...; png, jpg, jpeg, webp, bmp), or any file a caption table lists;
- a caption or metadata file (``.txt`` sidecars, the caption tables, ``.json``, ``.csv``, tensors, ...):
  used when it captions a sample, else ignored (``not_media``);
- anything else: a *candidate*: ``prepare`` probes it, keeps it when it is a video (a container FFmpeg reads
  under a suffix frameloom does not know) and ignores it otherwise, counted in the summary by reason.

Captions, first match wins:

1. a sidecar ``.txt`` with the same stem in the same folder (``clips/a.mp4`` <- ``clips/a.txt``);
2. ``captions.csv`` (columns ``path``, ``text``, any others) or ``captions.jsonl`` (one
   ``{"path": ..., "text": ..., ...}`` per line) at the root, with paths relative to the root.

A caption file obeys the same path rules as media (``data/paths.py``): a sidecar or caption table that is a
symlink leading out of the root is never read (the sample is rejected as ``outside_root``; a caption table,
an error). Columns of the caption table other than ``path``/``text`` (e.g. the synthetic set's
``color``/``shape``/``direction``) are carried into the rows; they apply even when a sidecar supplies the
text. A sample without any caption keeps ``text`` "" (an unconditional sample). This module opens no media.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from frameloom.data.coerce import CellError
from frameloom.data.dialects.base import (
    Listing,
    Part,
    WriteResult,
    absolute,
    json_objects,
    json_values,
    read_json_lines,
    read_text,
    rebased_paths,
    typed_table,
)
from frameloom.data.manifest import SCHEMA_TYPES
from frameloom.data.paths import OUTSIDE_ROOT, OutsideRoot, PathRules, resolve_entry
from frameloom.data.probe import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from frameloom.errors import FrameloomError

MEDIA_SUFFIXES: frozenset[str] = VIDEO_SUFFIXES | IMAGE_SUFFIXES
CAPTION_TABLES: tuple[str, ...] = ("captions.csv", "captions.jsonl")
NOT_MEDIA_SUFFIXES: frozenset[str] = frozenset(
    {
        ".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet", ".md", ".rst", ".yaml", ".yml", ".toml",
        ".xml", ".html", ".pdf", ".py", ".sh", ".log", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz",
        ".safetensors", ".pkl", ".pickle", ".srt", ".vtt", ".ass", ".ssa", ".sub", ".zip", ".tar", ".gz",
        ".tgz", ".7z", ".lock", ".db", ".sqlite", ".nfo", ".ini", ".cfg",
    }
)  # fmt: skip
"""Caption, metadata and other files that are never media (never probed; ignored unless they caption)."""
IGNORED_NOT_MEDIA = "not_media"
IGNORED_HIDDEN = "hidden"


def _normalize(root: Path, listed: str) -> str:
    """A caption table's path as the key the scan uses: POSIX, relative to the root when inside it."""
    p = Path(str(listed).replace("\\", "/"))
    if p.is_absolute():
        try:
            return Path(os.path.normpath(p)).relative_to(Path(os.path.abspath(root))).as_posix()
        except ValueError:
            return str(p)  # outside the root: kept absolute (prepare rejects it)
    return PurePosixPath(os.path.normpath(p.as_posix())).as_posix()


def _checked_table(root: Path, name: str, rules: PathRules) -> Path | None:
    """The caption table ``name`` at the root, if present; one that leads out of the root is an error."""
    path = root / name
    if not (path.is_file() or path.is_symlink()):
        return None
    try:
        resolve_entry(root, name, rules.extra_roots, bound=True)
    except OutsideRoot as exc:
        raise FrameloomError(
            f"{path}: {exc.detail}; a caption table obeys the same path rules as media"
        ) from None
    return path if path.is_file() else None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        read_text(path)  # not UTF-8: one line naming the line
        # Let Arrow infer numeric columns (aesthetic scores...), but path and text are always text.
        options = pacsv.ConvertOptions(column_types={"path": pa.string(), "text": pa.string()})
        table = pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FrameloomError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if "path" not in table.column_names:
        raise FrameloomError(f"{path} needs a 'path' column (has: {', '.join(table.column_names)})")
    rows = table.to_pylist()
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("path"), str) or not row["path"].strip():
            raise FrameloomError(f"{path}, row {number}, column 'path': is empty")
        for name in ("crop", "captions"):
            if isinstance(row.get(name), str) and row[name].strip().startswith("["):
                try:
                    row[name] = json.loads(row[name])
                except json.JSONDecodeError:
                    raise FrameloomError(
                        f"{path}, row {number}, column {name!r}: {row[name]!r} is not a JSON list"
                    ) from None
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    entries = []
    for number, entry in read_json_lines(path):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"].strip():
            raise FrameloomError(f"{path}, line {number}: expected an object with a non-empty 'path'")
        entries.append(entry)
    return entries


def _check_types(path: Path, entries: list[dict[str, Any]]) -> None:
    """Cells of the manifest's own columns must read as their types: one line naming the table, row, column."""
    names = list(dict.fromkeys(k for e in entries for k in e if k in SCHEMA_TYPES))
    try:
        typed_table({n: [e.get(n) for e in entries] for n in names}, source=str(path))
    except CellError as exc:
        raise FrameloomError(str(exc)) from None


def read_caption_tables(root: str | os.PathLike, rules: PathRules | None = None) -> dict[str, dict[str, Any]]:
    """The root's ``captions.csv`` and ``captions.jsonl`` entries, keyed by normalized path.

    Each value holds ``text`` (may be None) and the table's other columns. A path listed twice is an error:
    silently keeping one caption of two would hide a data problem.
    """
    root = Path(root)
    rules = rules or PathRules()
    table: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for name, reader in (("captions.csv", _read_csv), ("captions.jsonl", _read_jsonl)):
        path = _checked_table(root, name, rules)
        if path is None:
            continue
        entries = reader(path)
        _check_types(path, entries)
        for entry in entries:
            key = _normalize(root, entry["path"])
            if key in table:
                raise FrameloomError(f"{key} has two captions ({where[key]} and {name}); keep one")
            table[key] = {k: v for k, v in entry.items() if k != "path"}
            where[key] = name
    return table


def _scan(root: Path) -> tuple[list[str], list[str], set[str], Counter]:
    """(media, candidates, caption-like files, ignored counts) under ``root``, POSIX paths relative to it."""
    media, candidates, texts = [], [], set()
    ignored: Counter = Counter()
    for dirpath, dirnames, filenames in os.walk(root):
        hidden = [d for d in dirnames if d.startswith(".")]
        ignored[IGNORED_HIDDEN] += len(hidden)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if name.startswith("."):
                ignored[IGNORED_HIDDEN] += 1
                continue
            suffix = Path(name).suffix.lower()
            if suffix in MEDIA_SUFFIXES:
                media.append(rel)
            elif suffix in NOT_MEDIA_SUFFIXES:
                texts.add(rel)
            elif os.path.isfile(Path(dirpath) / name):
                candidates.append(rel)
    return media, candidates, texts, ignored


def _sidecar(root: Path, rel: str, rules: PathRules) -> tuple[str | None, str | None, str | None]:
    """(sidecar caption text or None, the sidecar's relative path or None, refusal detail or None)."""
    if Path(rel).is_absolute():
        return None, None, None
    side = PurePosixPath(rel).with_suffix(".txt").as_posix()
    file = root / side
    if not (file.is_file() or file.is_symlink()):
        return None, None, None
    try:
        resolve_entry(root, side, rules.extra_roots, bound=True)
    except OutsideRoot as exc:
        return None, side, f"sidecar caption {side}: {exc.detail}"
    if not file.is_file():
        return None, None, None
    return read_text(file).strip(), side, None


def read_folder(
    root: str | os.PathLike, rules: PathRules | None = None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """List a folder's samples with their captions (media files and caption-table entries; see
    ``list_folder`` for candidates and ignored files).

    Returns (rows, rejects). Each row has ``path`` (POSIX, relative to ``root``; absolute for a caption-table
    entry outside it), ``text`` ("" when uncaptioned) and the caption table's extra columns; rows are sorted
    by path. Rejects are ``(path, reason)``: ``missing`` for caption-table entries whose file does not exist,
    ``outside_root`` for a sample whose sidecar caption leads out of the root.
    """
    rows, rejects, _, _ = _read(Path(root), rules or PathRules())
    for row in rows:
        row.pop("_candidate")
    return rows, [(p, reason) for p, reason, _ in rejects]


def _read(
    root: Path, rules: PathRules
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]], list[str], Counter]:
    if not root.is_dir():
        raise FrameloomError(f"not a folder: {root}")
    captions = read_caption_tables(root, rules)
    media, candidates, texts, ignored = _scan(root)
    rejects: list[tuple[str, str, str]] = []
    paths = set(media)
    for listed in captions:
        if listed in paths:
            continue
        file = Path(listed) if Path(listed).is_absolute() else root / listed
        if file.is_file() or file.is_symlink():
            paths.add(listed)  # listed explicitly: a sample whatever its suffix; the probe decides
        else:
            rejects.append((listed, "missing", "listed in a caption table, no such file"))
    candidates = [c for c in candidates if c not in paths]
    used: set[str] = set()
    rows = []
    for rel in sorted(paths) + sorted(candidates):
        entry = captions.get(rel, {})
        text, side, refused = _sidecar(root, rel, rules)
        if side is not None:
            used.add(side)
        if refused is not None:
            rejects.append((rel, OUTSIDE_ROOT, refused))
            continue
        if text is None:
            text = entry.get("text")
        rows.append({**entry, "path": rel, "text": "" if text is None else str(text)})
    orphans = texts - used - set(CAPTION_TABLES) - set(paths)
    if orphans:
        ignored[IGNORED_NOT_MEDIA] += len(orphans)
    candidate_set = set(candidates)
    for row in rows:
        row["_candidate"] = row["path"] in candidate_set
    return rows, rejects, candidates, ignored


def list_folder(root: str | os.PathLike, rules: PathRules | None = None) -> Listing:
    """The folder as a dialect ``Listing``: one part, entries relative to ``root``; candidates marked (see
    the module doc); caption-table entries without a file and refused sidecars as rejects."""
    root = Path(root)
    rows, rejects, _, ignored = _read(root, rules or PathRules())
    candidate = np.array([r.pop("_candidate") for r in rows], bool)
    names: list[str] = ["path", "text"]
    for r in rows:
        names += [k for k in r if k not in names]
    try:
        table = typed_table({n: [r.get(n) for r in rows] for n in names}, source=str(root / "captions table"))
    except CellError as exc:
        raise FrameloomError(str(exc)) from None
    out_rejects = [(str(absolute(root, p)), reason, detail) for p, reason, detail in rejects]
    return Listing(
        [Part(root, table, str(root), candidate)], bound=True, rejects=out_rejects, ignored=ignored
    )


def write_folder(
    data: pa.Table | Iterable[pa.Table], out: str | os.PathLike, *, base: str | os.PathLike
) -> WriteResult:
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
    file = out / "captions.jsonl"
    tmp = file.with_name(file.name + ".tmp")
    rows = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for part in [data] if isinstance(data, pa.Table) else data:
            if part.num_rows == 0:
                continue
            names = part.column_names
            fields = []
            for name in ["path", "text"] + [
                n for n in names if n not in ("path", "text", "aspect_ratio", "resolution")
            ]:
                if name == "text":
                    col = (
                        pc.fill_null(part.column("text"), "")
                        if "text" in names
                        else pa.array([""] * part.num_rows)
                    )
                elif name in ("path", "latent", "text_fea", "condition_image"):
                    col = rebased_paths(part.column(name), base, out)
                else:
                    col = part.column(name)
                fields.append((name, json_values(col)))
            fh.write("\n".join(json_objects(fields).to_pylist()) + "\n")
            rows += part.num_rows
    os.replace(tmp, file)
    return WriteResult([file], rows)


__all__ = [
    "CAPTION_TABLES",
    "MEDIA_SUFFIXES",
    "NOT_MEDIA_SUFFIXES",
    "list_folder",
    "read_caption_tables",
    "read_folder",
    "write_folder",
]
