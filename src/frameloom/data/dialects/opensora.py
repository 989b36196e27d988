"""The Open-Sora dialect: a CSV or Parquet table, a folder of Parquet shards, or the memory-efficient pair.

Columns ``path,text,num_frames,height,width,aspect_ratio,resolution,fps`` (SEED_FACTS.md), any of them but
``path`` may be missing (``prepare`` probes them); ``aspect_ratio`` is h / w, ``resolution`` h * w and ``fps``
rounded to 3 decimals, as Open-Sora's meta tools write them. Open-Sora's aesthetic score column ``aes`` is
the manifest's ``aesthetic``. Every other column is carried as is, so the manifest's own columns (cut, crop,
captions, ...) survive a trip through this dialect; Open-Sora ignores columns it does not know. List cells
are JSON text in CSV, native lists in Parquet.

Paths: Open-Sora's tools write absolute paths, which are accepted as written (``data/paths.py``); relative
ones are taken from the table's folder (Open-Sora takes them from its working directory, which makes a table
mean different files depending on where training starts).

**Memory-efficient layout** (Open-Sora 2.0 ``scripts/cnv/shard.py`` and ``--dataset.memory_efficient``):
``X.parquet`` plus a sibling folder ``X/`` of shards ``00001.parquet``, ``00002.parquet``, ... . The shards
split the rows into K = 10,000 parts of ``ceil(N / K)`` rows (empty parts are not written) and hold every
column but ``num_frames, height, width, aspect_ratio, fps, resolution``; the seed then reads ``path`` and
those six from ``X.parquet`` and the rest of row i from shard ``i // ceil(N / K)`` (shards in name order),
checking that both name the same path. ``read_opensora`` reads such a pair that way, shard by shard;
``write_opensora(..., memory_efficient=True)`` writes it. A folder of ``.parquet`` files given on its own is
read as one table in name order (shards without the measured columns are probed by ``prepare``).

Everything is columnar and streaming: a CSV in blocks, Parquet by row groups, shards one at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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
    rebased_paths,
    table_slices,
    typed_table,
)
from frameloom.data.manifest import SCHEMA_TYPES
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
EFFICIENT_SHARDS = 10_000
"""K of Open-Sora's memory-efficient layout: the reader assumes ceil(N / 10000) rows per shard."""
EFFICIENT_MAIN = ("path", "num_frames", "height", "width", "aspect_ratio", "fps", "resolution")
"""What the seed reads from X.parquet in memory-efficient mode; the shards hold the other columns."""
SHARD_NAME = re.compile(r"^\d{5}\.parquet$")
BLOCK_ROWS = 262_144


def shard_files(folder: Path) -> list[Path]:
    """The Parquet files of a folder, in name order."""
    return sorted(p for p in Path(folder).glob("*.parquet") if p.is_file())


def efficient_folder(source: Path) -> Path | None:
    """``X/`` beside ``X.parquet`` when it holds the memory-efficient layout's shards, else None."""
    if source.suffix.lower() != ".parquet":
        return None
    folder = source.with_suffix("")
    if folder.is_dir() and any(SHARD_NAME.match(p.name) for p in folder.iterdir()):
        return folder
    return None


def _cannot_read(path: Path, exc: BaseException) -> FrameloomError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "Empty CSV file" in text:
        text = "the file is empty (it needs at least a header line)"
    return FrameloomError(f"cannot read {path}: {text}")


def _csv_blocks(path: Path) -> Iterator[pa.Table]:
    """A CSV in blocks; canonical columns as text (typed by ``typed_table``), others as Arrow infers them."""
    try:
        with pacsv.open_csv(path) as reader:
            names = reader.schema.names
        known = {n for n in names if RENAME_IN.get(n, n) in SCHEMA_TYPES}
        convert = pacsv.ConvertOptions(
            column_types={n: pa.string() for n in known},
            strings_can_be_null=True,
            null_values=list(CSV_NULLS),
        )
        read = pacsv.ReadOptions(block_size=1 << 24)
        with pacsv.open_csv(path, read_options=read, convert_options=convert) as reader:
            for batch in reader:
                yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise _cannot_read(path, exc) from None


def _parquet_blocks(path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    try:
        reader = pq.ParquetFile(path)
        names = reader.schema_arrow.names
        cols = None if columns is None else [c for c in columns if c in names]
        empty = True
        for batch in reader.iter_batches(batch_size=BLOCK_ROWS, columns=cols):
            empty = False
            yield pa.Table.from_batches([batch])
        if empty:
            schema = reader.schema_arrow
            yield (schema if cols is None else pa.schema([schema.field(c) for c in cols])).empty_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise _cannot_read(path, exc) from None


def _blocks(path: Path) -> Iterator[pa.Table]:
    return _csv_blocks(path) if path.suffix.lower() == ".csv" else _parquet_blocks(path)


def _efficient_blocks(main: Path, folder: Path) -> Iterator[tuple[Path, pa.Table]]:
    """The memory-efficient pair read the seed's way: (shard, its rows with every column)."""
    try:
        total = pq.ParquetFile(main).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise _cannot_read(main, exc) from None
    per = max(1, math.ceil(total / EFFICIENT_SHARDS))
    shards = sorted(p for p in folder.iterdir() if p.is_file())  # the seed lists every file, in name order
    main_blocks = _parquet_blocks(main, list(EFFICIENT_MAIN))
    buffer: pa.Table | None = None
    done = 0
    for shard in shards:
        want = min(per, total - done)
        if want <= 0:
            raise FrameloomError(
                f"{shard}: more shards than {main} has rows for ({total} rows, {per} per shard)"
            )
        while buffer is None or buffer.num_rows < want:
            block = next(main_blocks, None)
            if block is None:
                break
            buffer = block if buffer is None else pa.concat_tables([buffer, block])
        head = buffer.slice(0, want)
        buffer = buffer.slice(want)
        rest = pa.concat_tables(list(_parquet_blocks(shard))) if shard.suffix == ".parquet" else None
        if rest is None or "path" not in rest.column_names or rest.num_rows != want:
            got = "no parquet" if rest is None else f"{rest.num_rows} rows"
            raise FrameloomError(
                f"{shard}: expected {want} rows of {main} (rows {done + 1}..{done + want}), found {got}; "
                "the shard folder must hold exactly the shards of this file"
            )
        if not pc.all(
            pc.equal(pc.fill_null(rest.column("path"), ""), pc.fill_null(head.column("path"), ""))
        ).as_py():
            raise FrameloomError(f"{shard}: its paths differ from rows {done + 1}..{done + want} of {main}")
        for name in rest.column_names:
            if name not in head.column_names:
                head = head.append_column(name, rest.column(name))
        done += want
        yield shard, head
    if done != total:
        raise FrameloomError(f"{folder}: the shards hold {done} of the {total} rows of {main}")


def _typed(block: pa.Table, source: str, first_row: int) -> pa.Table:
    columns: dict[str, Any] = {}
    for name in block.column_names:
        columns[RENAME_IN.get(name, name)] = block.column(name)
    try:
        return typed_table(columns, source=source, first_row=first_row)
    except CellError as exc:
        raise FrameloomError(str(exc)) from None


def iter_tables(source: str | os.PathLike) -> Iterator[tuple[Path, pa.Table]]:
    """(file, block) of a CSV/Parquet file, a memory-efficient pair, or each shard of a folder, streamed.

    Blocks are typed (``typed_table``: ``aes`` renamed ``aesthetic``, canonical columns cast); each file's
    rows are numbered from 1 in error messages.
    """
    source = Path(source)
    if source.is_dir():
        files = shard_files(source)
        if not files:
            raise FrameloomError(f"{source} holds no .parquet shards")
        for file in files:
            row = 1
            for block in _parquet_blocks(file):
                _need_path(file, block)
                yield file, _typed(block, str(file), row)
                row += block.num_rows
        return
    folder = efficient_folder(source)
    if folder is not None:
        row = 1
        for shard, block in _efficient_blocks(source, folder):
            yield shard, _typed(block, f"{source} (+ {shard.name})", row)
            row += block.num_rows
        return
    row = 1
    for block in _blocks(source):
        _need_path(source, block)
        yield source, _typed(block, str(source), row)
        row += block.num_rows


def _need_path(file: Path, block: pa.Table) -> None:
    if "path" not in block.column_names:
        raise FrameloomError(f"{file} needs a 'path' column (has: {', '.join(block.column_names) or 'none'})")


def _parts(source: Path, root: Path, rejects: list[tuple[str, str, str]]) -> Iterator[Part]:
    for file, table in iter_tables(source):
        path = table.column("path")
        empty = pc.or_(pc.is_null(path), pc.equal(pc.utf8_trim_whitespace(pc.fill_null(path, "")), ""))
        if pc.any(empty).as_py():
            rows = pc.indices_nonzero(empty).to_pylist()
            for i in rows:
                rejects.append((f"{file.name}:{i + 1}", BAD_ENTRY, f"a row of {file} has no path"))
            table = table.filter(pc.invert(empty))
        yield Part(root, table, str(file))


def read_opensora(source: str | os.PathLike) -> Listing:
    """List an Open-Sora table, shard folder or memory-efficient pair as streamed parts.

    Paths are relative to the table's folder (for a shard folder: the folder itself); absolute paths are
    accepted as written. Empty cells stay null, so ``prepare`` probes them.
    """
    source = Path(source)
    root = source if source.is_dir() else source.parent
    rejects: list[tuple[str, str, str]] = []
    return Listing(_parts(source, root, rejects), bound=False, rejects=rejects)


# --------------------------------------------------------------------------------------------- writing


def _column_order(names: list[str]) -> list[str]:
    names = [RENAME_OUT.get(n, n) for n in names]
    return [c for c in COLUMNS if c in names] + [n for n in names if n not in COLUMNS]


def _out_table(table: pa.Table, base: Path, root: Path, csv: bool) -> pa.Table:
    """A manifest slice as Open-Sora writes it: paths rebased on ``root``, fps to 3 decimals, ``aes``."""
    columns = {}
    for name in table.column_names:
        col = table.column(name)
        if name in ("path", "latent", "text_fea", "condition_image"):
            col = rebased_paths(col, base, root)
        elif name == "fps":
            col = pc.round(col, 3)
        elif csv and (pa.types.is_list(col.type) or pa.types.is_struct(col.type)):
            col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
        columns[RENAME_OUT.get(name, name)] = col
    out = pa.table(columns)
    return out.select(_column_order(out.column_names))


class _Writer:
    """One output file written slice by slice (Parquet or CSV), atomically (temp file, then rename)."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.csv = path.suffix.lower() == ".csv"
        self._writer: Any = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.csv:
                self._writer = pacsv.CSVWriter(str(self.tmp), table.schema)
            else:
                self._writer = pq.ParquetWriter(str(self.tmp), table.schema)
        self._writer.write_table(table.cast(self._writer.schema) if not self.csv else table)
        self.rows += table.num_rows

    def close(self) -> Path:
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.path


def write_opensora(
    data: pa.Table | Iterable[pa.Table],
    out: str | os.PathLike,
    *,
    base: str | os.PathLike,
    memory_efficient: bool = False,
    total_rows: int | None = None,
) -> WriteResult:
    """Write a manifest (a table, or validated slices of one) as an Open-Sora ``.csv`` or ``.parquet``.

    ``memory_efficient`` (Parquet only) also writes the sibling shard folder of the memory-efficient layout
    (module doc); it needs the row count up front (``total_rows``, or a table). Earlier ``NNNNN.parquet``
    files beyond the new count are removed. Paths are relative to the output's folder when the media lie
    under it, else absolute. Slice by slice: memory stays bounded by the slice size.
    """
    out, base = Path(out), Path(base)
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise FrameloomError(f"--to opensora writes a .csv or .parquet file, not {out}")
    if memory_efficient and out.suffix.lower() != ".parquet":
        raise FrameloomError(
            "the memory-efficient layout is X.parquet plus the folder X/; give a .parquet --out"
        )
    if isinstance(data, pa.Table):
        total_rows = data.num_rows
    if memory_efficient and total_rows is None:
        raise ValueError("memory_efficient needs total_rows")
    main = _Writer(out)
    shards: list[Path] = []
    folder = out.with_suffix("")
    per = max(1, math.ceil((total_rows or 0) / EFFICIENT_SHARDS))
    pending: pa.Table | None = None
    measured = {"num_frames", "height", "width", "aspect_ratio", "fps", "resolution"}

    def flush(part: pa.Table) -> None:
        file = folder / f"{len(shards) + 1:05d}.parquet"
        tmp = file.with_name(file.name + ".tmp")
        pq.write_table(part.select([n for n in part.column_names if n not in measured]), tmp)
        os.replace(tmp, file)
        shards.append(file)

    if memory_efficient:
        folder.mkdir(parents=True, exist_ok=True)
    for table in table_slices(data, BLOCK_ROWS):
        if table.num_rows == 0 and main.rows:
            continue
        written = _out_table(table, base, out.parent, main.csv)
        main.write(written)
        if memory_efficient and written.num_rows:
            pending = written if pending is None else pa.concat_tables([pending, written])
            while pending.num_rows >= per:
                flush(pending.slice(0, per))
                pending = pending.slice(per)
    if main._writer is None:
        main.write(pa.table({c: pa.array([], pa.string()) for c in COLUMNS}))
    files = [main.close()]
    if memory_efficient:
        if pending is not None and pending.num_rows:
            flush(pending)
        for stale in folder.iterdir():
            if SHARD_NAME.match(stale.name) and stale not in shards:
                stale.unlink()
        files += shards
    return WriteResult(files, main.rows)


def detect(source: Path) -> bool:
    """A .csv/.parquet file, or a folder of .parquet shards."""
    if source.is_file():
        return source.suffix.lower() in (".csv", ".parquet")
    return source.is_dir() and bool(shard_files(source))


__all__ = [
    "COLUMNS",
    "EFFICIENT_SHARDS",
    "detect",
    "efficient_folder",
    "iter_tables",
    "read_opensora",
    "shard_files",
    "write_opensora",
]
