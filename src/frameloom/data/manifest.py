"""The canonical manifest: one row per sample, stored as Parquet (CSV accepted).

Column names follow Open-Sora where it has them, so an Open-Sora CSV already is a manifest (DESIGN.md,
"Canonical manifest"). Everything downstream of the dialect readers reads only this schema.

The manifest is kept columnar (a ``pyarrow.Table``) so that a 10-million-row manifest never becomes
10 million Python objects; ``iter_rows`` is there for small manifests and tools.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from frameloom.data.coerce import CSV_NULLS, CellError, coerce_column
from frameloom.data.paths import PathRules
from frameloom.errors import FrameloomError

# name -> arrow type. Required columns first.
REQUIRED: dict[str, pa.DataType] = {
    "path": pa.string(),
    "text": pa.string(),
    "num_frames": pa.int64(),
    "height": pa.int64(),
    "width": pa.int64(),
    "fps": pa.float64(),
    "aspect_ratio": pa.float64(),
    "resolution": pa.int64(),
}
OPTIONAL: dict[str, pa.DataType] = {
    "captions": pa.list_(pa.string()),
    "cut_start": pa.int64(),
    "cut_end": pa.int64(),
    "crop": pa.list_(pa.int64()),
    "aesthetic": pa.float64(),
    "tech": pa.float64(),
    "motion": pa.float64(),
    "is_image": pa.bool_(),
    "latent": pa.string(),
    "text_fea": pa.string(),
    "condition_image": pa.string(),
    "codec": pa.string(),
    "rotation": pa.int64(),
    "duration": pa.float64(),
}
SCHEMA_TYPES: dict[str, pa.DataType] = {**REQUIRED, **OPTIONAL}


class ManifestError(FrameloomError):
    """A manifest that cannot be read or does not follow the schema."""


PATH_COLUMNS: tuple[str, ...] = ("path", "latent", "text_fea", "condition_image")
"""Columns that hold file paths (relative to the manifest's folder, or absolute)."""


def derived_columns(height: int, width: int) -> dict[str, Any]:
    """``aspect_ratio`` (h / w) and ``resolution`` (h * w), as Open-Sora's meta tools compute them."""
    return {"aspect_ratio": height / width if width else 0.0, "resolution": int(height) * int(width)}


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _values(table: pa.Table, name: str, dtype: Any, fill: Any) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = pc.fill_null(col, fill)
    return col.to_numpy().astype(dtype, copy=False)


def _check_values(table: pa.Table, where: str, first_row: int) -> None:
    """Ranges: frames and sizes >= 1, fps finite and >= 0 (empty: unknown), a cut inside the frames, a crop
    inside the frame. Raises ``ManifestError`` naming the first bad row and column."""
    n = table.num_rows

    def fail(i: int, name: str, problem: str) -> None:
        raise ManifestError(f"{where}, row {first_row + i}, column {name!r}: {problem}")

    for name in ("path", "num_frames", "height", "width"):
        col = table.column(name)
        if col.null_count:
            fail(_first(~np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), bool)), name, "is empty")
    if n == 0:
        return
    for name in ("num_frames", "height", "width"):
        v = _values(table, name, np.int64, 1)
        if (v < 1).any():
            i = _first(v < 1)
            fail(i, name, f"{int(v[i])} must be at least 1")
    if "fps" in table.column_names:
        fps = _values(table, "fps", np.float64, 0.0)
        bad = ~np.isfinite(fps) | (fps < 0)
        if bad.any():
            i = _first(bad)
            fail(i, "fps", f"{fps[i]} is not a frame rate (leave the cell empty when unknown)")
    frames = _values(table, "num_frames", np.int64, 1)
    start = (
        _values(table, "cut_start", np.int64, 0)
        if "cut_start" in table.column_names
        else np.zeros(n, np.int64)
    )
    if "cut_end" in table.column_names:
        end = _values(table, "cut_end", np.int64, -1)
        end = np.where(end < 0, frames, end)
    else:
        end = frames
    bad = (start < 0) | (end <= start) | (end > frames)
    if bad.any():
        i = _first(bad)
        fail(i, "cut_start" if start[i] < 0 else "cut_end",
             f"cut [{start[i]}, {end[i]}) is not a range inside the {frames[i]} frames")  # fmt: skip
    if "crop" in table.column_names and table.column("crop").null_count < n:
        crops = table.column("crop").to_pylist()
        heights = _values(table, "height", np.int64, 1)
        widths = _values(table, "width", np.int64, 1)
        for i, crop in enumerate(crops):
            if crop is None:
                continue
            if len(crop) != 4:
                fail(i, "crop", f"{crop} is not [x0, x1, y0, y1]")
            x0, x1, y0, y1 = crop
            if not (0 <= x0 < x1 <= widths[i] and 0 <= y0 < y1 <= heights[i]):
                fail(i, "crop", f"{crop} (x0, x1, y0, y1) is outside the {widths[i]}x{heights[i]} frame")


def validate(table: pa.Table, *, where: str = "manifest", first_row: int = 1, fill: bool = True) -> pa.Table:
    """Check the required columns exist, cast every known column to its schema type and check the values.

    Cells are read by ``coerce.coerce_column`` (``30.0`` is 30, JSON text is a list); a cell that cannot be
    read, an empty required cell or a value out of range is a ``ManifestError`` naming ``where``, the row
    and the column. ``text`` may be absent (every sample is unconditional) and empty cells of it are "";
    ``aspect_ratio``/``resolution`` are derived from height and width where absent or empty. Unknown columns
    are kept (users and later stages may carry extra attributes, e.g. the synthetic set's
    ``color``/``direction``). Returns the cast table. ``fill=False`` skips adding the absent optional
    columns (for readers of a few columns).
    """
    missing = [c for c in ("path", "num_frames", "height", "width") if c not in table.column_names]
    if missing:
        raise ManifestError(f"{where}: missing required column(s) {', '.join(missing)}")
    for name, want in SCHEMA_TYPES.items():
        if name in table.column_names:
            idx = table.column_names.index(name)
            try:
                col = coerce_column(table.column(name), want, source=where, name=name, first_row=first_row)
            except CellError as exc:
                raise ManifestError(str(exc)) from None
            table = table.set_column(idx, name, col)
    _check_values(table, where, first_row)
    if not fill:
        return table
    n = table.num_rows
    if "text" not in table.column_names:
        table = table.append_column("text", pa.array([""] * n, pa.string()))
    elif table.column("text").null_count:
        table = table.set_column(
            table.column_names.index("text"), "text", pc.fill_null(table.column("text"), "")
        )
    h = _values(table, "height", np.int64, 1)
    w = _values(table, "width", np.int64, 1)
    derived = {"aspect_ratio": pa.array(h / w, pa.float64()), "resolution": pa.array(h * w, pa.int64())}
    for name, value in derived.items():
        if name not in table.column_names:
            table = table.append_column(name, value)
        elif table.column(name).null_count:
            idx = table.column_names.index(name)
            table = table.set_column(idx, name, pc.coalesce(table.column(name), value))
    if "fps" not in table.column_names:
        table = table.append_column("fps", pa.nulls(n, pa.float64()))
    return table


def from_rows(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a validated manifest table from row dicts; ``aspect_ratio``/``resolution`` are derived if absent."""
    rows = [dict(r) for r in rows]
    for r in rows:
        missing = [c for c in ("path", "num_frames", "height", "width") if c not in r]
        if missing:
            raise ManifestError(f"row {r.get('path', '?')}: missing required column(s) {', '.join(missing)}")
        if "aspect_ratio" not in r or "resolution" not in r:
            r.update(derived_columns(r["height"], r["width"]))
    names: list[str] = list(REQUIRED)
    for r in rows:
        names += [k for k in r if k not in names]
    if not rows:
        return pa.table({n: pa.array([], type=t) for n, t in REQUIRED.items()})
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values, type=SCHEMA_TYPES.get(name))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise ManifestError(f"column {name!r}: {str(exc).splitlines()[0]}") from None
    return validate(pa.table(columns))


def _read_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The file's table (only ``columns``, those of them it has, when given); CSV cells as text."""
    try:
        if path.suffix.lower() == ".csv":
            # Every column as text first (types are decided by ``validate``, which names the bad cell); empty
            # cells are nulls, as pandas writes them (Open-Sora's CSVs come from pandas).
            with pacsv.open_csv(path) as reader:
                names = reader.schema.names
            want = names if columns is None else [c for c in columns if c in names]
            options = pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=True,
                null_values=list(CSV_NULLS),
                include_columns=want,
            )
            return pacsv.read_csv(path, convert_options=options)
        if columns is None:
            return pq.read_table(path)
        names = pq.read_schema(path).names
        return pq.read_table(path, columns=[c for c in columns if c in names])
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Empty CSV file" in text:
            text = "the file is empty (a CSV manifest needs at least its header line)"
        raise ManifestError(f"cannot read manifest {path}: {text}") from None


def read_manifest(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet or CSV manifest and validate it (``validate``); with ``columns``, only those of them
    the file has, plus the required ones (nothing absent is added)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    if path.is_dir():
        raise ManifestError(f"manifest {path} is a folder; give the .parquet or .csv file")
    if columns is None:
        return validate(_read_table(path), where=str(path))
    want = list(dict.fromkeys(["path", "num_frames", "height", "width", *columns]))
    return validate(_read_table(path, want), where=str(path), fill=False)


def manifest_rows(path: str | os.PathLike) -> int:
    """Rows of a manifest without reading it (Parquet: from the footer; CSV: counted)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _read_table(path, ["path"]).num_rows
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {str(exc).splitlines()[0]}") from None


def iter_manifest(path: str | os.PathLike, batch_rows: int = 262_144) -> Iterator[pa.Table]:
    """A manifest in validated slices of at most ``batch_rows`` rows (Parquet: read slice by slice, so a
    10-million-row manifest is never all in memory; CSV: read whole, then sliced). Errors name the row."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    if path.is_dir():
        raise ManifestError(f"manifest {path} is a folder; give the .parquet or .csv file")
    if path.suffix.lower() == ".csv":
        table = _read_table(path)
        for start in range(0, max(table.num_rows, 1), batch_rows):
            yield validate(table.slice(start, batch_rows), where=str(path), first_row=start + 1)
        return
    try:
        reader = pq.ParquetFile(path)
        start = 0
        empty = True
        for batch in reader.iter_batches(batch_size=batch_rows):
            empty = False
            yield validate(pa.Table.from_batches([batch]), where=str(path), first_row=start + 1)
            start += batch.num_rows
        if empty:
            yield validate(reader.schema_arrow.empty_table(), where=str(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {str(exc).splitlines()[0]}") from None


def check_paths(
    table: pa.Table,
    manifest_path: str | os.PathLike,
    rules: PathRules | None = None,
    *,
    first_row: int = 1,
) -> None:
    """Refuse a manifest whose path columns leave its folder (``data/paths.py``), by the text of the paths.

    A relative path must stay inside the manifest's folder (no ``..`` leading out); with ``rules.strict``
    an absolute path must lie under the folder or an extra root. This is the check every entry point
    (``train``, ``cache``, ``inspect``) runs on load, columnar; symlinks are followed where a file is opened
    (the cache builder, the on-the-fly dataset), since following millions of them at start-up would touch
    every file. Raises ``ManifestError`` with the count and the first offending rows.
    """
    rules = rules or PathRules()
    base = os.path.normpath(os.path.abspath(Path(manifest_path).parent))
    roots = [base] + [os.path.normpath(os.path.abspath(r)) for r in rules.extra_roots]
    problems: list[tuple[int, str, str]] = []
    count = 0
    for name in PATH_COLUMNS:
        if name not in table.column_names:
            continue
        col = table.column(name)
        if pa.types.is_null(col.type):
            continue
        nul = pc.fill_null(pc.match_substring(col, "\0"), False)
        if pc.any(nul).as_py():
            i = int(np.flatnonzero(np.asarray(nul.to_numpy(zero_copy_only=False), bool))[0])
            raise ManifestError(
                f"{manifest_path}, row {first_row + i}, column {name!r}: the path holds a NUL byte"
            )
        # A cheap scan first (RE2 on a literal: faster than Arrow's substring kernel); the Python below only
        # sees the rows it flags.
        check = pc.fill_null(pc.match_substring_regex(col, r"\.\."), False)
        if rules.strict:
            check = pc.or_(check, pc.fill_null(pc.starts_with(col, "/"), False))
        rows = np.flatnonzero(np.asarray(check.to_numpy(zero_copy_only=False), bool))
        for i in rows.tolist():
            text = col[i].as_py()
            if not text.startswith("/") and ".." not in text.split("/"):
                continue  # '..' inside a name (clip..mp4), not a parent step
            full = os.path.normpath(text if text.startswith("/") else f"{base}/{text}")
            if text.startswith("/") and not rules.strict:
                continue
            if any(full == r or full.startswith(r + "/") for r in roots):
                continue
            count += 1
            if len(problems) < 3:
                problems.append((first_row + i, name, text))
    if count:
        shown = "; ".join(f"row {r}, column {n!r}: {t!r}" for r, n, t in problems)
        how = "outside its folder" + (" and the allowed roots" if rules.extra_roots else "")
        raise ManifestError(
            f"{manifest_path}: {count} path(s) lead {how} (outside_root), e.g. {shown}; "
            "fix the manifest, or allow the folder with data.extra_roots"
        )


def load_manifest(path: str | os.PathLike, rules: PathRules | None = None) -> pa.Table:
    """``read_manifest`` followed by ``check_paths``: what ``train``, ``cache`` and ``inspect`` read."""
    table = read_manifest(path)
    check_paths(table, path, rules)
    return table


def write_manifest(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) as Parquet, or CSV with list cells as JSON text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".csv":
        cols = {}
        for name in table.column_names:
            col = table.column(name)
            if pa.types.is_list(col.type):
                col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
            cols[name] = col
        pacsv.write_csv(pa.table(cols), tmp)
    else:
        pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


class ManifestWriter:
    """Write a manifest slice by slice (Parquet, or CSV with list cells as JSON text), atomically: a temp file
    renamed over ``path`` by ``close``; ``abort`` removes it. The first slice fixes the columns and their
    order; later slices are aligned to them (absent columns are empty, all-empty columns take the type)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.csv = self.path.suffix.lower() == ".csv"
        self.schema: pa.Schema | None = None
        self._writer: Any = None
        self.rows = 0

    def _for_csv(self, table: pa.Table) -> pa.Table:
        cols = {}
        for name in table.column_names:
            col = table.column(name)
            if pa.types.is_list(col.type):
                col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
            cols[name] = col
        return pa.table(cols)

    def _align(self, table: pa.Table) -> pa.Table:
        assert self.schema is not None
        cols = []
        for f in self.schema:
            if f.name not in table.column_names:
                cols.append(pa.nulls(table.num_rows, f.type))
                continue
            col = table.column(f.name)
            if col.type != f.type:
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise ManifestError(
                        f"column {f.name!r} changes type from {f.type} to {col.type} mid-file"
                    ) from None
            cols.append(col)
        extra = [
            n
            for n in table.column_names
            if n not in self.schema.names and table.column(n).null_count < table.num_rows
        ]
        if extra:
            raise ManifestError(f"column(s) {', '.join(extra)} appear after the first rows of the source")
        return pa.Table.from_arrays(cols, schema=self.schema)

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            fields = [
                pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in table.schema
            ]
            self.schema = pa.schema(fields)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.csv:
                self._writer = pacsv.CSVWriter(
                    str(self.tmp), self._for_csv(self._align(table.slice(0, 0))).schema
                )
            else:
                self._writer = pq.ParquetWriter(str(self.tmp), self.schema)
        table = self._align(table)
        self._writer.write_table(self._for_csv(table) if self.csv else table)
        self.rows += table.num_rows

    def close(self) -> Path:
        if self._writer is None:
            self.write(pa.table({n: pa.array([], t) for n, t in REQUIRED.items()}))
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - cleaning up after an error already being raised
                pass
        self.tmp.unlink(missing_ok=True)


def resolve_path(manifest_path: str | os.PathLike, sample_path: str) -> Path:
    """A sample's file: absolute paths stay, relative ones are taken from the manifest's folder."""
    p = Path(sample_path)
    return p if p.is_absolute() else Path(manifest_path).resolve().parent / p


def iter_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """Rows as dicts (for small manifests and tools; the sampler works on columns)."""
    yield from table.to_pylist()
