"""What every dialect shares: the columnar listing a reader returns, and path handling of readers and writers.

A reader maps a seed system's dataset files into ``Part``s: Arrow tables of entries that share one root, with
``path`` as the file writes it and the canonical manifest columns the file gives (DESIGN.md, "Canonical
manifest"), already cast to their types (``data/coerce.py``: a bad cell is one line naming file, row and
column). Large sources are read part by part (a CSV in blocks, Parquet in row groups, shards one by one), so
``prepare`` never holds more than one part as Python objects. A writer takes a manifest table (paths relative
to ``base``, the manifest's folder, or absolute) and writes the dialect's files with paths relative to the
dialect's own root, column by column.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from frameloom.data.coerce import CellError, coerce_column
from frameloom.data.manifest import SCHEMA_TYPES
from frameloom.errors import FrameloomError

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
class Part:
    """Entries of one root, as columns: ``path`` (as written) and the field columns.

    ``candidate`` marks entries found by looking at a folder whose suffix is not a known media suffix: they
    are probed, and one that is not media is ignored (counted) rather than rejected.

    ``latent_geometry``: for formats whose entries may name a pre-extracted ``latent`` file encoded by a
    known VAE (Pyramid Flow), ``(C, T, h, w) -> (frames, height, width)`` of the clip it was encoded from;
    ``prepare`` then keeps an entry whose media file is gone but whose latent file exists (training reads
    only the latent), with its size taken from the latent.
    """

    root: Path
    table: pa.Table
    source: str = ""
    candidate: np.ndarray | None = None
    latent_geometry: Callable[[tuple[int, ...]], tuple[int, int, int]] | None = None

    def entries(self) -> list[Entry]:
        out = []
        for row in self.table.to_pylist():
            path = row.pop("path")
            out.append(Entry(self.root, path, {k: v for k, v in row.items() if v is not None}))
        return out


@dataclass
class Listing:
    """A reader's result: parts in file order, and what it could not use.

    ``bound``: whether the format defines a root for its entries (a folder, Open-Sora-Plan's DATA_ROOT,
    CogVideoX's data root), so that an absolute path must lie under it too (``data/paths.py``).
    ``rejects`` are ``(path, reason, detail)``; ``ignored`` counts files a folder scan skipped, by reason.
    Both are complete once ``parts`` has been consumed (streaming readers fill them as they go).
    """

    parts: Iterable[Part]
    bound: bool = True
    rejects: list[tuple[str, str, str]] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)

    @property
    def entries(self) -> list[Entry]:
        """Every entry as an ``Entry`` (for small listings and tests; consumes streaming parts)."""
        if not isinstance(self.parts, list):
            self.parts = list(self.parts)
        return [e for part in self.parts for e in part.entries()]


@dataclass
class WriteResult:
    """What a writer wrote: the files, how many rows, and notes for the user (rows left out and why)."""

    files: list[Path]
    rows: int
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for the terminal."""
        shown = [str(f) for f in self.files[:3]] + (
            [f"... ({len(self.files)} files)"] if len(self.files) > 3 else []
        )
        text = f"wrote {self.rows} rows to {', '.join(shown)}"
        return text + "".join(f"; {n}" for n in self.notes)


def typed_table(columns: dict[str, Any], *, source: str, first_row: int = 1) -> pa.Table:
    """A reader's columns (Arrow arrays or Python lists) as a table, canonical columns cast to their types.

    Columns the schema does not know keep the type Arrow infers; one that mixes types (a number here, text
    there) is kept as text. Raises ``CellError`` naming ``source``, row and column for a cell that cannot be
    read as its canonical type.
    """
    out = {}
    for name, values in columns.items():
        want = SCHEMA_TYPES.get(name)
        if want is None and name == "path":
            want = pa.string()
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            arr = values
        else:
            try:
                arr = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                if want is None:
                    arr = pa.array([None if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                                    for v in values], pa.string())  # fmt: skip
                else:
                    arr = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                                   pa.string())  # fmt: skip
        if want is not None:
            arr = coerce_column(arr, want, source=source, name=name, first_row=first_row)
        elif pa.types.is_struct(arr.type) or pa.types.is_map(arr.type):
            arr = pa.array([None if v is None else json.dumps(v) for v in arr.to_pylist()], pa.string())
        out[name] = arr
    return pa.table(out) if out else pa.table({"path": pa.array([], pa.string())})


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


def _norm_where_needed(col: pa.Array) -> pa.Array:
    """``os.path.normpath`` for the paths that need it (``.``/``..`` parts, doubled slashes), others as is."""
    needs = pc.fill_null(pc.match_substring_regex(col, r"(^|/)\.{1,2}(/|$)|//"), False)
    if not pc.any(needs).as_py():
        return col
    values = col.to_pylist()
    for i in np.flatnonzero(np.asarray(needs.to_numpy(zero_copy_only=False), bool)).tolist():
        values[i] = os.path.normpath(values[i])
    return pa.array(values, pa.string())


def absolute_paths(col: pa.Array | pa.ChunkedArray, base: Path) -> pa.Array:
    """A path column made absolute (relative ones from ``base``) and normalised, as columns."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    col = col.cast(pa.string())
    base_text = os.path.normpath(os.path.abspath(base))
    tilde = pc.fill_null(pc.starts_with(col, "~"), False)
    if pc.any(tilde).as_py():
        col = pa.array(
            [os.path.expanduser(v) if v and v.startswith("~") else v for v in col.to_pylist()], pa.string()
        )
    is_abs = pc.fill_null(pc.starts_with(col, "/"), False)
    joined = pc.if_else(is_abs, col, pc.binary_join_element_wise(base_text, col, "/"))
    return _norm_where_needed(joined)


def rebased_paths(col: pa.Array | pa.ChunkedArray, base: Path, root: Path) -> pa.Array:
    """A manifest path column (relative to ``base``, or absolute) written for a dialect rooted at ``root``:
    relative to ``root`` where the file lies under it, else absolute. Columnar: millions of rows in a second."""
    full = absolute_paths(col, base)
    root_text = os.path.normpath(os.path.abspath(root))
    prefix = root_text.rstrip("/") + "/"
    inside = pc.fill_null(pc.starts_with(full, prefix), False)
    stripped = pc.utf8_slice_codeunits(full, len(prefix))
    return pc.if_else(inside, stripped, full)


# ------------------------------------------------------------------------------- JSON, column by column

try:  # the C encoder of the json module: one string to its JSON form (non-ASCII kept), at C speed
    from json.encoder import c_encode_basestring as _encode_string  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - pure-Python fallback
    from json.encoder import py_encode_basestring as _encode_string


def json_values(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each cell of a column as JSON text (null where the cell is null, or a float is not finite).

    Columnar for numbers and booleans; one C-level call per string; ``json.dumps`` per cell only for lists
    and structs. Writers assemble records from these (``json_objects``) instead of building a dict per row.
    """
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.string())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.array([None if v is None else _encode_string(v) for v in col.to_pylist()], pa.string())
    if pa.types.is_boolean(t):
        return pc.if_else(col, "true", "false")
    if pa.types.is_integer(t):
        return pc.cast(col, pa.string())
    if pa.types.is_floating(t):
        finite = pc.is_finite(col)
        return pc.if_else(finite, pc.cast(col, pa.string()), pa.scalar(None, pa.string()))
    return pa.array(
        [None if v is None else json.dumps(v, ensure_ascii=False) for v in col.to_pylist()], pa.string()
    )


def json_objects(fields: list[tuple[str, pa.Array]], lead: pa.Array | None = None) -> pa.Array:
    """JSON object text per row from ``(key, JSON text column)`` pairs, in order; a null cell leaves its key
    out. ``lead``: the object's first member(s) as text (``'"video": "a.mp4"'``), never null; without it the
    first field must never be null (it opens the object)."""
    parts: list[pa.Array] = [] if lead is None else [pc.binary_join_element_wise("{", lead, "")]
    for key, values in fields:
        first = not parts
        head = ("{" if first else ", ") + json.dumps(key) + ": "
        joined = pc.binary_join_element_wise(head, values, "")
        parts.append(joined if first else pc.fill_null(joined, ""))
    return pc.binary_join_element_wise(*parts, "}", "")


def read_text(path: Path) -> str:
    """A dataset text file's content; not UTF-8 is one ``FrameloomError`` line naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FrameloomError(
            f"{path}, line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the file as UTF-8"
        ) from None


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-empty line of a JSON-lines file (UTF-8)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FrameloomError(
                    f"{path}, line {number}: not UTF-8 text; save the file as UTF-8"
                ) from None
            if number == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise FrameloomError(f"{path}, line {number}: not JSON ({msg})") from None


def one_line(text: Any) -> str:
    """A caption on one line (line-based formats split on line breaks)."""
    return " ".join(str(text or "").replace("\r\n", "\n").replace("\r", "\n").split("\n"))


__all__ = [
    "BAD_ENTRY",
    "CellError",
    "Entry",
    "Listing",
    "MEASURED",
    "PATH_FIELDS",
    "Part",
    "WriteResult",
    "absolute",
    "absolute_paths",
    "json_objects",
    "json_values",
    "one_line",
    "read_json_lines",
    "read_text",
    "rebased_paths",
    "relative_or_absolute",
    "typed_table",
]


WRITE_SLICE_ROWS = 262_144
"""Rows a dialect writer handles at once when given one whole table (bounded memory per slice)."""


def table_slices(data: pa.Table | Iterable[pa.Table], rows: int = WRITE_SLICE_ROWS) -> Iterator[pa.Table]:
    """A writer's input as slices: a table cut into ``rows``-row slices (one empty slice for an empty table),
    or the given iterable of tables as it is."""
    if isinstance(data, pa.Table):
        for start in range(0, max(data.num_rows, 1), rows):
            yield data.slice(start, rows)
    else:
        yield from data
