"""The ImageNet dialect: class-labelled images, one folder per class, or a table with a ``label`` column.

Folder layout (torchvision ``ImageFolder``, as DiT's ``train.py`` and fast-DiT's ``extract_features.py`` read
ImageNet): ``root/<class>/**/<image>``; classes are the sub-folder names sorted, a class's label is its
position in that order, images are found recursively (hidden names skipped). Each sample becomes a row with
``text`` = the label as a string (the caption a class-conditional model reads), ``label`` and ``class_name``.

Table form (``labels.csv`` / ``.jsonl`` / ``.parquet`` with ``path`` and ``label``, optional ``class_name``;
paths relative to the table's folder): the same rows from a list. ``write_imagenet`` writes that table, so
``convert --to imagenet`` round-trips without copying images into class folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from frameloom.data.dialects.base import Entry, Listing, WriteResult, rebase, table_rows
from frameloom.data.probe import IMAGE_SUFFIXES
from frameloom.errors import FrameloomError

__all__ = ["class_folders", "read_imagenet", "write_imagenet"]

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")


def class_folders(root: Path) -> list[str]:
    """The class names of an ImageNet-layout root: its non-hidden sub-folders, sorted (ImageFolder order)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return found


def _read_folder(root: Path) -> Listing:
    classes = class_folders(root)
    if not classes:
        raise FrameloomError(f"{root} has no class folders (ImageNet layout: root/<class>/<image>)")
    entries = []
    for label, name in enumerate(classes):
        for file in _images(root / name):
            fields = {"text": str(label), "label": label, "class_name": name, "is_image": True}
            entries.append(Entry(root=root, path=file.relative_to(root).as_posix(), fields=fields))
    return Listing(entries)


def _table_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            table = pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(column_types={"path": pa.string()})
            )
        elif suffix == ".parquet":
            table = pq.read_table(path)
        else:
            with open(path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
    except (pa.ArrowInvalid, OSError, json.JSONDecodeError) as exc:
        raise FrameloomError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return table.to_pylist()


def _read_table(path: Path) -> Listing:
    entries, rejects = [], []
    for number, row in enumerate(_table_rows(path), 1):
        if not isinstance(row, dict) or not row.get("path") or row.get("label") is None:
            rejects.append((str(path), "bad_entry", f"row {number}: needs 'path' and 'label'"))
            continue
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            rejects.append(
                (str(row["path"]), "bad_entry", f"row {number}: label {row['label']!r} is not an integer")
            )
            continue
        if label < 0:
            rejects.append((str(row["path"]), "bad_entry", f"row {number}: negative label {label}"))
            continue
        fields = {"text": str(label), "label": label}
        if row.get("class_name") is not None:
            fields["class_name"] = str(row["class_name"])
        entries.append(Entry(root=path.parent, path=str(row["path"]), fields=fields))
    return Listing(entries, rejects)


def read_imagenet(source: str | os.PathLike) -> Listing:
    """A class-folder root or a label table (module docstring) as a dialect ``Listing``."""
    source = Path(source)
    if source.is_dir():
        return _read_folder(source)
    if source.suffix.lower() in TABLE_SUFFIXES:
        return _read_table(source)
    raise FrameloomError(
        f"--format imagenet reads a class-folder root or a {'/'.join(TABLE_SUFFIXES)} table, not {source}"
    )


def write_imagenet(table: pa.Table, out: str | os.PathLike, *, base: str | os.PathLike) -> WriteResult:
    """Write ``out`` (a ``.csv``; a folder gets ``labels.csv``) with ``path,label,class_name`` per labelled row;
    rows without a label (whose text is not a class index either) are left out and counted."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        out = out / "labels.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], 0
    for row in table_rows(table, Path(base)):
        label = row.get("label")
        if label is None and str(row.get("text", "")).strip().isdigit():
            label = int(str(row["text"]).strip())
        if label is None:
            skipped += 1
            continue
        row = rebase(row, out.parent)
        rows.append({"path": row["path"], "label": int(label), "class_name": row.get("class_name")})
    pacsv.write_csv(pa.Table.from_pylist(rows, schema=pa.schema(
        [("path", pa.string()), ("label", pa.int64()), ("class_name", pa.string())])), out)  # fmt: skip
    notes = [f"{skipped} row(s) without a label left out"] if skipped else []
    return WriteResult([out], len(rows), notes)
