"""The Open-Sora dialect: a CSV or Parquet table, or a folder of Parquet shards.

Columns ``path,text,num_frames,height,width,aspect_ratio,resolution,fps`` (SEED_FACTS.md), any of them but
``path`` may be missing (``prepare`` probes them); ``aspect_ratio`` is h / w, ``resolution`` h * w and ``fps``
rounded to 3 decimals, as Open-Sora's meta tools write them. Open-Sora's aesthetic score column ``aes`` is
the manifest's ``aesthetic``. Every other column is carried as is, so the manifest's own columns (cut, crop,
captions, ...) survive a trip through this dialect; Open-Sora ignores columns it does not know. List cells
are JSON text in CSV, native lists in Parquet.

Relative paths are taken from the table's folder (Open-Sora takes them from its working directory, which
makes a table mean different files depending on where training starts). The memory-efficient layout is a
folder of ``part-NNNNN.parquet`` shards with a fixed number of rows each, read one shard at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from frameloom.data.dialects.base import (
    BAD_ENTRY,
    Entry,
    Listing,
    WriteResult,
    rebase,
    table_rows,
)
from frameloom.data.manifest import OPTIONAL
from frameloom.errors import FrameloomError

COLUMNS: tuple[str, ...] = (
    "path",
    "text",
    "num_frames",
    "height",
    "width",
    "aspect_ratio",
    "resolution",
    "fps",
)
"""Open-Sora's columns, in its order."""
RENAME_IN = {"aes": "aesthetic"}
RENAME_OUT = {v: k for k, v in RENAME_IN.items()}
SHARD_PATTERN = "part-{:05d}.parquet"
DEFAULT_ROWS_PER_SHARD = 100_000

_LIST_COLUMNS = {name for name, t in OPTIONAL.items() if pa.types.is_list(t)}


def shard_files(folder: Path) -> list[Path]:
    """The Parquet shards of a folder, in name order."""
    return sorted(p for p in Path(folder).glob("*.parquet") if p.is_file())


def _read_table(path: Path) -> pa.Table:
    try:
        if path.suffix.lower() == ".csv":
            options = pacsv.ConvertOptions(
                column_types={"path": pa.string(), "text": pa.string()}, strings_can_be_null=True
            )
            return pacsv.read_csv(path, convert_options=options)
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FrameloomError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def iter_tables(source: str | os.PathLike) -> Iterator[tuple[Path, pa.Table]]:
    """(file, table) for a CSV/Parquet file, or for each shard of a folder, one at a time."""
    source = Path(source)
    files = shard_files(source) if source.is_dir() else [source]
    if source.is_dir() and not files:
        raise FrameloomError(f"{source} holds no .parquet shards")
    for file in files:
        table = _read_table(file)
        if "path" not in table.column_names:
            raise FrameloomError(f"{file} needs a 'path' column (has: {', '.join(table.column_names)})")
        yield file, table


def _decode(name: str, value: Any) -> Any:
    if name in _LIST_COLUMNS and isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else None
        except json.JSONDecodeError:
            return value
    return value


def read_opensora(source: str | os.PathLike) -> Listing:
    """List an Open-Sora table (or shard folder) as entries with the columns it gives.

    Paths are relative to the table's folder (for a shard folder: the folder itself). Empty cells are
    left out, so ``prepare`` probes them.
    """
    source = Path(source)
    root = source if source.is_dir() else source.parent
    entries: list[Entry] = []
    rejects: list[tuple[str, str, str]] = []
    for file, table in iter_tables(source):
        for number, row in enumerate(table.to_pylist(), 1):
            path = row.pop("path", None)
            if not isinstance(path, str) or not path.strip():
                rejects.append((f"{file.name}:{number}", BAD_ENTRY, f"row {number} of {file} has no path"))
                continue
            fields = {RENAME_IN.get(k, k): _decode(k, v) for k, v in row.items() if v is not None}
            entries.append(Entry(root=root, path=path, fields=fields))
    return Listing(entries, rejects)


def _out_rows(table: pa.Table, base: Path, root: Path) -> Iterator[dict[str, Any]]:
    for row in table_rows(table, base):
        row = rebase(row, root)
        if "fps" in row:
            row["fps"] = round(float(row["fps"]), 3)
        yield {RENAME_OUT.get(k, k): v for k, v in row.items()}


def _arrow(rows: list[dict[str, Any]], names: list[str], csv: bool) -> pa.Table:
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        if csv and any(isinstance(v, (list, tuple, dict)) for v in values):
            values = [None if v is None else json.dumps(v) for v in values]
        columns[name] = pa.array(values)
    return pa.table(columns)


def _column_order(table: pa.Table) -> list[str]:
    names = [RENAME_OUT.get(n, n) for n in table.column_names]
    return [c for c in COLUMNS if c in names] + [n for n in names if n not in COLUMNS]


def write_opensora(
    table: pa.Table,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike,
    rows_per_shard: int | None = None,
) -> WriteResult:
    """Write a manifest as an Open-Sora table.

    ``out`` ending in ``.csv`` or ``.parquet`` gives one file; any other ``out`` (or ``rows_per_shard``) a
    folder of ``part-NNNNN.parquet`` shards with ``rows_per_shard`` rows each (default 100,000), written one
    shard at a time. Shards of an earlier write beyond the new count are removed (only files named like
    the shards). Paths are relative to the output's folder when the media lie under it, else absolute.
    """
    out, base = Path(out), Path(base)
    names = _column_order(table)
    sharded = rows_per_shard is not None or out.suffix.lower() not in (".csv", ".parquet")
    if not sharded:
        out.parent.mkdir(parents=True, exist_ok=True)
        csv = out.suffix.lower() == ".csv"
        arrow = _arrow(list(_out_rows(table, base, out.parent)), names, csv)
        tmp = out.with_name(out.name + ".tmp")
        if csv:
            pacsv.write_csv(arrow, tmp)
        else:
            pq.write_table(arrow, tmp)
        os.replace(tmp, out)
        return WriteResult([out], table.num_rows)

    per = rows_per_shard or DEFAULT_ROWS_PER_SHARD
    if per < 1:
        raise FrameloomError(f"rows per shard must be at least 1, got {per}")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for number, start in enumerate(range(0, max(table.num_rows, 1), per)):
        part = table.slice(start, per)
        file = out / SHARD_PATTERN.format(number)
        tmp = file.with_name(file.name + ".tmp")
        pq.write_table(_arrow(list(_out_rows(part, base, out)), names, csv=False), tmp)
        os.replace(tmp, file)
        files.append(file)
    for stale in out.glob("part-*.parquet"):
        if stale not in files and stale.name[5:10].isdigit():
            stale.unlink()
    return WriteResult(files, table.num_rows)


def detect(source: Path) -> bool:
    """A .csv/.parquet file, or a folder of .parquet shards with nothing else that is media."""
    if source.is_file():
        return source.suffix.lower() in (".csv", ".parquet")
    return source.is_dir() and bool(shard_files(source))


__all__ = ["COLUMNS", "detect", "iter_tables", "read_opensora", "shard_files", "write_opensora"]
