"""Typed columns from untrusted cells: every dataset file is parsed through here.

A dataset file from elsewhere may hold anything in any cell: text in ``num_frames``, ``30.0`` for 30 (pandas
writes an integer column that has a null as floats), a truncated JSON list in ``crop``, ``1e30``, ``nan``.
``coerce_column`` turns one column into its canonical Arrow type, columnar (no Python object per cell except
for JSON list cells held as text), and raises ``CellError`` naming the file, the row and the column of the
first cell that cannot be read, so the command ends in one line instead of a traceback.

What is a type error here (the file is malformed) and what is a value problem (a well-formed record that
cannot be used, e.g. ``fps`` NaN or ``num_frames`` 0) are kept apart: this module only parses; the callers
check ranges (``manifest.validate``) or reject rows (``prepare``'s ``bad_metadata``).

Rows are numbered from 1 in file order (the first record of a CSV is row 1, its header is not a row).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from frameloom.errors import FrameloomError

__all__ = ["CSV_NULLS", "CellError", "coerce_column", "cell_error", "INT_LIMIT"]

INT_LIMIT = 2**53
"""Integers beyond this are refused: a float cannot hold them exactly, and no frame count or size is that big."""

# A number as text: optional sign, digits with an optional fraction and exponent, or nan/inf.
_NUMBER = r"^\s*[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)\s*$"
CSV_NULLS: tuple[str, ...] = ("", "NA", "N/A", "NULL", "null", "None", "#N/A")
"""CSV cells read as empty. Not ``nan``: a NaN is a value (an fps that cannot be right), not a missing one."""
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class CellError(FrameloomError):
    """A cell that cannot be read as its column's type; the message names file, row and column."""


def cell_error(source: str, row: int, name: str, problem: str) -> CellError:
    """``"<source>, row <row>, column '<name>': <problem>"``."""
    return CellError(f"{source}, row {row}, column {name!r}: {problem}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_bad(mask: pa.Array | np.ndarray) -> int:
    """Index of the first True in a boolean mask (nulls count as False)."""
    arr = mask.to_numpy(zero_copy_only=False) if isinstance(mask, (pa.Array, pa.ChunkedArray)) else mask
    arr = np.asarray(arr)
    if arr.dtype == object:
        arr = np.array([bool(v) for v in arr])
    return int(np.flatnonzero(arr)[0])


def _combine(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _strings_to_float(col: pa.Array, source: str, name: str, first_row: int) -> pa.Array:
    text = pc.utf8_trim_whitespace(col)
    empty = pc.equal(text, "")
    text = pc.if_else(empty, pa.scalar(None, pa.string()), text)
    ok = pc.match_substring_regex(text, _NUMBER, ignore_case=True)
    bad = pc.and_(pc.is_valid(text), pc.invert(pc.fill_null(ok, False)))
    if pc.any(bad).as_py():
        i = _first_bad(bad)
        raise cell_error(source, first_row + i, name, f"{_show(col[i].as_py())} is not a number")
    return pc.cast(text, pa.float64())


def _to_float(col: pa.Array, source: str, name: str, first_row: int) -> pa.Array:
    t = col.type
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.float64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _strings_to_float(col.cast(pa.string()), source, name, first_row)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return pc.cast(col, pa.float64())
    if pa.types.is_dictionary(t):
        return _to_float(col.dictionary_decode(), source, name, first_row)
    i = _first_valid(col)
    raise cell_error(source, first_row + i, name, f"{_show(col[i].as_py())} is not a number")


def _first_valid(col: pa.Array) -> int:
    valid = np.flatnonzero(np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), bool))
    return int(valid[0]) if valid.size else 0


def _to_int(col: pa.Array, source: str, name: str, first_row: int) -> pa.Array:
    t = col.type
    if pa.types.is_integer(t):
        values = pc.cast(col, pa.float64())  # range check below
    else:
        values = _to_float(col, source, name, first_row)
    arr = values.to_numpy(zero_copy_only=False).astype(np.float64)
    valid = np.asarray(pc.is_valid(values).to_numpy(zero_copy_only=False), bool)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(arr)
        bad = valid & (~finite | (np.abs(np.where(finite, arr, 0)) > INT_LIMIT) | (arr != np.round(arr)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = col[i].as_py()
        what = "is not a whole number" if finite[i] and abs(arr[i]) <= INT_LIMIT else "is out of range"
        raise cell_error(source, first_row + i, name, f"{_show(value)} {what}")
    if pa.types.is_integer(t):
        return pc.cast(col, pa.int64())
    ints = np.where(valid, np.where(finite, arr, 0), 0).astype(np.int64)
    return pa.array(ints, pa.int64(), mask=~valid)


def _to_bool(col: pa.Array, source: str, name: str, first_row: int) -> pa.Array:
    t = col.type
    if pa.types.is_boolean(t):
        return col
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.bool_())
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        bad = pc.and_(pc.is_valid(col), pc.invert(pc.is_in(col, pa.array([0, 1], col.type))))
        if pc.any(bad).as_py():
            i = _first_bad(bad)
            raise cell_error(source, first_row + i, name, f"{_show(col[i].as_py())} is not true or false")
        return pc.not_equal(col, pa.scalar(0, col.type))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = pc.utf8_lower(pc.utf8_trim_whitespace(col.cast(pa.string())))
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        true = pc.is_in(text, pa.array(_TRUE))
        false = pc.is_in(text, pa.array(_FALSE))
        bad = pc.and_(pc.is_valid(text), pc.invert(pc.or_(true, false)))
        if pc.any(bad).as_py():
            i = _first_bad(bad)
            raise cell_error(source, first_row + i, name, f"{_show(col[i].as_py())} is not true or false")
        return pc.if_else(pc.is_valid(text), true, pa.scalar(None, pa.bool_()))
    i = _first_valid(col)
    raise cell_error(source, first_row + i, name, f"{_show(col[i].as_py())} is not true or false")


def _to_string(col: pa.Array, source: str, name: str, first_row: int) -> pa.Array:
    t = col.type
    if pa.types.is_string(t):
        return col
    if pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return (
            col.cast(pa.string())
            if not pa.types.is_dictionary(t)
            else col.dictionary_decode().cast(pa.string())
        )
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.string())
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return pc.cast(col, pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        try:
            return col.cast(pa.string())
        except pa.ArrowInvalid:
            values = col.to_pylist()
            for i, v in enumerate(values):
                if v is not None:
                    try:
                        v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise cell_error(source, first_row + i, name, "is not UTF-8 text") from None
            raise
    i = _first_valid(col)
    raise cell_error(source, first_row + i, name, f"{_show(col[i].as_py())} is not text")


def _parse_list_cell(value: Any, source: str, row: int, name: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise cell_error(source, row, name, f"{_show(value)} is not a JSON list") from None
    if not isinstance(value, (list, tuple)):
        raise cell_error(source, row, name, f"{_show(value)} is not a list")
    return list(value)


def _to_list(col: pa.Array, want: pa.DataType, source: str, name: str, first_row: int) -> pa.Array:
    value_type = want.value_type
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        if col.type == want:
            return col
        values = col.to_pylist()
    elif pa.types.is_null(col.type):
        return pa.nulls(len(col), want)
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = [_parse_list_cell(v, source, first_row + i, name) for i, v in enumerate(col.to_pylist())]
    else:
        i = _first_valid(col)
        raise cell_error(source, first_row + i, name, f"{_show(col[i].as_py())} is not a list")
    out = []
    for i, items in enumerate(values):
        if items is None:
            out.append(None)
            continue
        cells = []
        for item in items:
            if pa.types.is_integer(value_type):
                ok = isinstance(item, int) and not isinstance(item, bool) and abs(item) <= INT_LIMIT
                if not ok and isinstance(item, float) and np.isfinite(item) and item == int(item):
                    ok, item = abs(item) <= INT_LIMIT, int(item)
                if not ok:
                    raise cell_error(
                        source, first_row + i, name, f"{_show(items)} holds {_show(item)}, not a whole number"
                    )
            elif pa.types.is_string(value_type):
                if not isinstance(item, str):
                    raise cell_error(
                        source, first_row + i, name, f"{_show(items)} holds {_show(item)}, not text"
                    )
            cells.append(item)
        out.append(cells)
    return pa.array(out, want)


def coerce_column(
    column: pa.Array | pa.ChunkedArray, want: pa.DataType, *, source: str, name: str, first_row: int = 1
) -> pa.Array | pa.ChunkedArray:
    """``column`` as type ``want`` (int64, float64, bool, string, or a list of int64/string).

    Text cells are trimmed; an empty cell is null. Integers: whole, finite numbers up to 2**53 (``30.0`` is
    30). Floats: any number, ``nan`` and ``inf`` included (ranges are the caller's). Booleans: true/false,
    1/0, yes/no. Lists: native lists, or JSON text (``"[0, 16, 0, 8]"``). Raises ``CellError`` for the first
    cell that cannot be read, naming ``source``, its row (``first_row`` is the first cell's) and ``name``.
    A column already of type ``want`` is returned as it is (ranges are the caller's to check).
    """
    if column.type == want:
        return column  # already typed (a Parquet column): nothing to parse, nothing to copy
    col = _combine(column)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_large_string(col.type):
        col = col.cast(pa.string())
    if want == pa.int64():
        return _to_int(col, source, name, first_row)
    if want == pa.float64():
        return _to_float(col, source, name, first_row)
    if want == pa.bool_():
        return _to_bool(col, source, name, first_row)
    if want == pa.string():
        return _to_string(col, source, name, first_row)
    if pa.types.is_list(want):
        return _to_list(col, want, source, name, first_row)
    raise TypeError(f"coerce_column: unsupported type {want}")
