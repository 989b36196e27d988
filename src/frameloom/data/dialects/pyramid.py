"""The Pyramid Flow dialect: a JSON-lines file, one sample per line.

Each line has ``video`` (or ``image``) and ``text``, and optionally ``latent`` and ``text_fea``: paths of
tensors extracted beforehand (SEED_FACTS.md; ``data/precomputed.py`` reads them). Pyramid Flow's tools write
absolute paths, which are accepted as written; relative ones are taken from the jsonl's folder and checked
like every other path (``data/paths.py``). Those tensor files are torch files, i.e. pickles:
``load_tensor`` opens them with ``torch.load(weights_only=True)`` only, which refuses anything but tensors
and plain containers, so a crafted file cannot run code.

A line whose video is gone but whose ``latent`` file exists is kept by ``prepare`` (the seed trains from the
latent alone), sized from the latent (``latent_geometry``). Read line by line into columns, a part of
``PART_LINES`` lines at a time; a value of the wrong type (a
number for ``text``, a list for ``video``) is one error naming the file, the line and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from frameloom.data.coerce import CellError
from frameloom.data.dialects.base import (
    BAD_ENTRY,
    Listing,
    Part,
    WriteResult,
    json_objects,
    json_values,
    read_json_lines,
    rebased_paths,
    table_slices,
    typed_table,
)
from frameloom.errors import FrameloomError

PART_LINES = 200_000
VAE_TIME, VAE_SPACE = 8, 8
"""Pyramid Flow's causal video VAE: 1 + 8k frames -> 1 + k latent frames, 8x8 pixels -> 1 latent cell."""


def latent_geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(frames, height, width) of the clip a Pyramid Flow latent ``(C, T, h, w)`` was encoded from (its
    causal VAE: ``VAE_TIME``/``VAE_SPACE``): ``(1 + 8 (T - 1), 8 h, 8 w)``."""
    _, t, h, w = shape
    return 1 + VAE_TIME * (t - 1), VAE_SPACE * h, VAE_SPACE * w


def _text_value(path: Path, number: int, key: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise FrameloomError(f"{path}, line {number}, key {key!r}: {value!r} is not text")


def _parts(source: Path, rejects: list[tuple[str, str, str]]) -> Iterator[Part]:
    root = source.parent
    columns: dict[str, list[Any]] = {"path": [], "text": [], "is_image": [], "latent": [], "text_fea": []}

    def flush() -> Part:
        try:
            table = typed_table(columns, source=str(source))
        except CellError as exc:
            raise FrameloomError(str(exc)) from None
        for values in columns.values():
            values.clear()
        return Part(root, table, str(source), latent_geometry=latent_geometry)

    for number, record in read_json_lines(source):
        if not isinstance(record, dict):
            rejects.append((f"{source.name}:{number}", BAD_ENTRY, f"line {number} is not a JSON object"))
            continue
        key = "video" if "video" in record else "image"
        path = _text_value(source, number, key, record.get(key))
        if path is None or not path.strip():
            rejects.append((f"{source.name}:{number}", BAD_ENTRY, f"line {number} has no 'video' or 'image'"))
            continue
        columns["path"].append(path)
        columns["text"].append(_text_value(source, number, "text", record.get("text")) or "")
        columns["is_image"].append(True if key == "image" else None)
        for name in ("latent", "text_fea"):
            value = _text_value(source, number, name, record.get(name))
            columns[name].append(value if value and value.strip() else None)
        if len(columns["path"]) >= PART_LINES:
            yield flush()
    if columns["path"] or not rejects:
        yield flush()


def read_pyramid(source: str | os.PathLike) -> Listing:
    """List a Pyramid Flow jsonl: ``video``/``image`` -> ``path`` (``is_image`` for images), ``text``,
    ``latent``, ``text_fea``; streamed in parts."""
    source = Path(source)
    rejects: list[tuple[str, str, str]] = []
    return Listing(_parts(source, rejects), bound=False, rejects=rejects)


def write_pyramid(
    data: pa.Table | Iterable[pa.Table], out: str | os.PathLike, *, base: str | os.PathLike
) -> WriteResult:
    """Write the jsonl ``out``; paths (and latent/text_fea) relative to its folder when under it."""
    out, base = Path(out), Path(base)
    if out.is_dir() or not out.suffix:
        out = out / "data.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    rows = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for table in table_slices(data):
            if table.num_rows == 0:
                continue
            names = table.column_names
            paths = json_values(rebased_paths(table.column("path"), base, out.parent))
            n = table.num_rows
            image = (
                pc.fill_null(table.column("is_image"), False)
                if "is_image" in names
                else pa.array([False] * n)
            )
            text = pc.fill_null(table.column("text"), "") if "text" in names else pa.array([""] * n)
            # "video" or "image" first (the seed's key for the file), then text and the tensor files.
            lead = pc.binary_join_element_wise(pc.if_else(image, '"image": ', '"video": '), paths, "")
            fields = [("text", json_values(text))]
            for name in ("latent", "text_fea"):
                if name in names:
                    fields.append((name, json_values(rebased_paths(table.column(name), base, out.parent))))
            lines = json_objects(fields, lead=lead)
            fh.write("\n".join(lines.to_pylist()) + "\n")
            rows += n
    os.replace(tmp, out)
    return WriteResult([out], rows)


def load_tensor(path: str | os.PathLike) -> Any:
    """Load a pre-extracted ``latent``/``text_fea`` file (``data/precomputed.py``: ``.pt`` with
    ``torch.load(weights_only=True)`` only, ``.npy`` without pickles, ``.safetensors``); anything else is a
    ``FrameloomError``, never executed."""
    from frameloom.data.precomputed import load_tensor_file  # imports torch; keep the dialect light

    return load_tensor_file(path)


def detect(source: Path) -> bool:
    """A .jsonl whose first record has ``video`` or ``image``."""
    if not (source.is_file() and source.suffix.lower() == ".jsonl"):
        return False
    with open(source, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line.lstrip("\ufeff"))
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and ("video" in first or "image" in first)
    return False


__all__ = ["detect", "latent_geometry", "load_tensor", "read_pyramid", "write_pyramid"]
