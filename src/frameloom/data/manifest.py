"""The canonical manifest: one row per sample, stored as Parquet (CSV accepted).

Column names follow Open-Sora where it has them, so an Open-Sora CSV already is a manifest (DESIGN.md,
"Canonical manifest"). Everything downstream of the dialect readers reads only this schema.

The manifest is kept columnar (a ``pyarrow.Table``) so that a 10-million-row manifest never becomes
10 million Python objects; ``iter_rows`` is there for small manifests and tools.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

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
    "codec": pa.string(),
    "rotation": pa.int64(),
    "duration": pa.float64(),
}
SCHEMA_TYPES: dict[str, pa.DataType] = {**REQUIRED, **OPTIONAL}


class ManifestError(FrameloomError):
    """A manifest that cannot be read or does not follow the schema."""


def derived_columns(height: int, width: int) -> dict[str, Any]:
    """``aspect_ratio`` (h / w) and ``resolution`` (h * w), as Open-Sora's meta tools compute them."""
    return {"aspect_ratio": height / width if width else 0.0, "resolution": int(height) * int(width)}


def _list_like(value: Any) -> Any:
    """CSV cells hold lists as JSON text; turn them back into lists."""
    if isinstance(value, str):
        return json.loads(value) if value.strip() else None
    return value


def _coerce_column(name: str, column: pa.ChunkedArray, want: pa.DataType) -> pa.ChunkedArray:
    if column.type == want:
        return column
    if pa.types.is_list(want) and pa.types.is_string(column.type):
        values = [_list_like(v) for v in column.to_pylist()]
        return pa.chunked_array([pa.array(values, type=want)])
    try:
        return column.cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ManifestError(
            f"manifest column {name!r} has type {column.type}, expected {want}: {exc}"
        ) from None


def validate(table: pa.Table, *, where: str = "manifest") -> pa.Table:
    """Check the required columns exist and cast every known column to its schema type.

    Unknown columns are kept (users and later stages may carry extra attributes, e.g. the synthetic set's
    ``color``/``direction``). Returns the cast table.
    """
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ManifestError(f"{where}: missing required column(s) {', '.join(missing)}")
    for name, want in SCHEMA_TYPES.items():
        if name in table.column_names:
            idx = table.column_names.index(name)
            table = table.set_column(idx, name, _coerce_column(name, table.column(name), want))
    nulls = [c for c in ("path", "num_frames", "height", "width") if table.column(c).null_count]
    if nulls:
        raise ManifestError(f"{where}: column(s) {', '.join(nulls)} have empty values")
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
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        columns[name] = pa.array(values, type=SCHEMA_TYPES.get(name))
    if not rows:
        return pa.table({n: pa.array([], type=t) for n, t in REQUIRED.items()})
    return validate(pa.table(columns))


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read a Parquet or CSV manifest and validate it."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    try:
        if path.suffix.lower() == ".csv":
            # empty cells are nulls, as pandas writes them (Open-Sora's CSVs come from pandas)
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        else:
            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    return validate(table, where=str(path))


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


def resolve_path(manifest_path: str | os.PathLike, sample_path: str) -> Path:
    """A sample's file: absolute paths stay, relative ones are taken from the manifest's folder."""
    p = Path(sample_path)
    return p if p.is_absolute() else Path(manifest_path).resolve().parent / p


def iter_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """Rows as dicts (for small manifests and tools; the sampler works on columns)."""
    yield from table.to_pylist()
