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

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from frameloom.data.coerce import CSV_NULLS, CellError
from frameloom.data.dialects.base import (
    BAD_ENTRY,
    Listing,
    Part,
    WriteResult,
    absolute,
    read_json_lines,
    rebased_paths,
    table_slices,
    typed_table,
)
from frameloom.data.probe import IMAGE_SUFFIXES
from frameloom.errors import FrameloomError

__all__ = ["class_folders", "read_imagenet", "write_imagenet"]

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
IGNORED_NOT_IMAGE = "not_image"
IGNORED_HIDDEN = "hidden"
_LABEL = r"^\s*\+?\d{1,18}\s*$"  # a non-negative integer that fits int64 (as text)


def class_folders(root: Path) -> list[str]:
    """The class names of an ImageNet-layout root: its non-hidden sub-folders, sorted (ImageFolder order)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _images(folder: Path, ignored: Counter) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); hidden and non-image files counted in ``ignored``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        ignored[IGNORED_HIDDEN] += sum(d.startswith(".") for d in dirnames)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                ignored[IGNORED_HIDDEN] += 1
            elif Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
            else:
                ignored[IGNORED_NOT_IMAGE] += 1
    return found


def _read_folder(root: Path) -> Listing:
    classes = class_folders(root)
    if not classes:
        raise FrameloomError(f"{root} has no class folders (ImageNet layout: root/<class>/<image>)")
    ignored: Counter = Counter()
    columns: dict[str, list[Any]] = {"path": [], "text": [], "label": [], "class_name": [], "is_image": []}
    for label, name in enumerate(classes):
        for file in _images(root / name, ignored):
            columns["path"].append(file.relative_to(root).as_posix())
            columns["text"].append(str(label))
            columns["label"].append(label)
            columns["class_name"].append(name)
            columns["is_image"].append(True)
    table = pa.table({
        "path": pa.array(columns["path"], pa.string()),
        "text": pa.array(columns["text"], pa.string()),
        "label": pa.array(columns["label"], pa.int64()),
        "class_name": pa.array(columns["class_name"], pa.string()),
        "is_image": pa.array(columns["is_image"], pa.bool_()),
    })  # fmt: skip
    # The root is the layout's own: entries (and symlinks among them) must stay under it.
    return Listing([Part(root, table, str(root))], bound=True, ignored=+ignored)


def _as_text(value: Any) -> str | None:
    """A JSON value as the text a CSV cell would hold (a bool or a float is not a label: kept unparseable)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return repr(value)


def _raw_table(path: Path) -> tuple[pa.Table, list[tuple[str, str, str]]]:
    """The table's ``path``/``label``/``class_name`` columns as text, and records that are not objects."""
    suffix = path.suffix.lower()
    rejects: list[tuple[str, str, str]] = []
    try:
        if suffix == ".csv":
            names = ("path", "label", "class_name")
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in names}, null_values=list(CSV_NULLS)
                ),
            )
        elif suffix == ".parquet":
            table = pq.read_table(path)
        else:
            columns: dict[str, list[Any]] = {"path": [], "label": [], "class_name": []}
            for number, record in read_json_lines(path):
                if not isinstance(record, dict):
                    rejects.append(
                        (f"{path.name}:{number}", BAD_ENTRY, f"line {number} is not a JSON object")
                    )
                    continue
                for name in columns:
                    columns[name].append(_as_text(record.get(name)))
            table = pa.table({n: pa.array(v, pa.string()) for n, v in columns.items()})
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise FrameloomError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    for name in ("path", "label"):
        if name not in table.column_names:
            raise FrameloomError(f"{path}: no {name!r} column (an imagenet table has path and label)")
    out = {}
    for name in ("path", "label", "class_name"):
        if name in table.column_names:
            col = table.column(name)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                try:
                    col = col.cast(pa.string())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    raise FrameloomError(
                        f"{path}, column {name!r}: {col.type} is not text or a number"
                    ) from None
            out[name] = col.combine_chunks().cast(pa.string())
    return pa.table(out), rejects


def _read_table(path: Path) -> Listing:
    """A label table as one part (columns: path, text = label, label, class_name); rows without a path or
    with a label that is not a non-negative integer are rejected (``bad_entry``), naming their row."""
    raw, rejects = _raw_table(path)
    paths, labels = raw.column("path"), pc.utf8_trim_whitespace(raw.column("label"))
    has_path = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(paths)), 0), False)
    good_label = pc.fill_null(pc.match_substring_regex(labels, _LABEL), False)
    ok = np.asarray(pc.and_(has_path, good_label).to_numpy(zero_copy_only=False), bool)
    for i in np.flatnonzero(~ok).tolist():
        number, listed, label = i + 1, paths[i].as_py(), labels[i].as_py()
        if not has_path[i].as_py() or label is None:
            rejects.append((f"{path.name}:{number}", BAD_ENTRY, f"row {number}: needs 'path' and 'label'"))
        else:
            problem = "is negative" if label.startswith("-") else "is not an integer"
            rejects.append(
                (str(absolute(path.parent, listed)), BAD_ENTRY, f"row {number}: label {label!r} {problem}")
            )
    keep = pa.array(ok)
    label_int = pc.cast(pc.replace_substring(labels.filter(keep), "+", ""), pa.int64())
    columns: dict[str, Any] = {
        "path": paths.filter(keep),
        "text": pc.cast(label_int, pa.string()),
        "label": label_int,
    }
    if "class_name" in raw.column_names:
        columns["class_name"] = raw.column("class_name").filter(keep)
    try:
        table = typed_table(columns, source=str(path))
    except CellError as exc:
        raise FrameloomError(str(exc)) from None
    # Like an Open-Sora CSV: relative paths from the table's folder, absolute ones as written.
    return Listing([Part(path.parent, table, str(path))], bound=False, rejects=rejects)


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


_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.int64()), ("class_name", pa.string())])


def _labelled(table: pa.Table, base: Path, folder: Path) -> tuple[pa.Table, int]:
    """(the slice's ``path,label,class_name`` rows that have a label, how many had none). A row without a
    ``label`` whose text is a class index takes that index."""
    n, names = table.num_rows, table.column_names
    label = table.column("label").cast(pa.int64()) if "label" in names else pa.nulls(n, pa.int64())
    if "text" in names:
        text = pc.utf8_trim_whitespace(table.column("text"))
        digits = pc.fill_null(pc.match_substring_regex(text, r"^\d{1,18}$"), False)
        from_text = pc.if_else(digits, text, pa.scalar(None, pa.string()))
        label = pc.coalesce(label, pc.cast(from_text, pa.int64()))
    keep = pc.is_valid(label)
    class_name = (
        table.column("class_name").cast(pa.string()) if "class_name" in names else pa.nulls(n, pa.string())
    )
    out = pa.table(
        {
            "path": rebased_paths(table.column("path"), base, folder),
            "label": label,
            "class_name": class_name,
        },
        schema=_SCHEMA,
    ).filter(keep)
    return out, n - out.num_rows


def write_imagenet(
    data: pa.Table | Iterable[pa.Table], out: str | os.PathLike, *, base: str | os.PathLike
) -> WriteResult:
    """Write ``out`` (a ``.csv``; a folder gets ``labels.csv``) with ``path,label,class_name`` per labelled row;
    rows without a label (whose text is not a class index either) are left out and counted. Written slice by
    slice, column by column; paths relative to the table's folder where the images lie under it."""
    out, base = Path(out), Path(base)
    if out.suffix.lower() != ".csv":
        out = out / "labels.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    rows = skipped = 0
    with pacsv.CSVWriter(str(tmp), _SCHEMA) as writer:
        for table in table_slices(data):
            if table.num_rows == 0:
                continue
            labelled, left_out = _labelled(table, base, out.parent)
            writer.write_table(labelled)
            rows += labelled.num_rows
            skipped += left_out
    os.replace(tmp, out)
    notes = [f"{skipped} row(s) without a label left out"] if skipped else []
    return WriteResult([out], rows, notes)
