"""The Pyramid Flow dialect: a JSON-lines file, one sample per line.

Each line has ``video`` (or ``image``) and ``text``, and optionally ``latent`` and ``text_fea``: paths of
tensors extracted beforehand (SEED_FACTS.md). Relative paths are taken from the jsonl's folder and checked
like every other path. Those tensor files are torch files, i.e. pickles: ``load_tensor`` opens them with
``torch.load(weights_only=True)`` only, which refuses anything but tensors and plain containers, so a
crafted file cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pyarrow as pa

from frameloom.data.dialects.base import (
    BAD_ENTRY,
    Entry,
    Listing,
    WriteResult,
    read_json_lines,
    rebase,
    table_rows,
)
from frameloom.errors import FrameloomError


def read_pyramid(source: str | os.PathLike) -> Listing:
    """List a Pyramid Flow jsonl: ``video``/``image`` -> ``path`` (``is_image`` for images), ``text``,
    ``latent``, ``text_fea``."""
    source = Path(source)
    root = source.parent
    entries, rejects = [], []
    for number, record in read_json_lines(source):
        key = "video" if isinstance(record, dict) and "video" in record else "image"
        path = record.get(key) if isinstance(record, dict) else None
        if not isinstance(path, str) or not path.strip():
            rejects.append((f"{source.name}:{number}", BAD_ENTRY, f"line {number} has no 'video' or 'image'"))
            continue
        fields: dict[str, Any] = {"text": str(record.get("text") or "")}
        if key == "image":
            fields["is_image"] = True
        for name in ("latent", "text_fea"):
            if isinstance(record.get(name), str) and record[name].strip():
                fields[name] = record[name]
        entries.append(Entry(root=root, path=path, fields=fields))
    return Listing(entries, rejects)


def write_pyramid(table: pa.Table, out: str | os.PathLike, *, base: str | os.PathLike) -> WriteResult:
    """Write the jsonl ``out``; paths (and latent/text_fea) relative to its folder when under it."""
    out, base = Path(out), Path(base)
    if out.is_dir() or not out.suffix:
        out = out / "data.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in table_rows(table, base):
        row = rebase(row, out.parent)
        record: dict[str, Any] = {"image" if row.get("is_image") else "video": row["path"]}
        record["text"] = row.get("text") or ""
        for name in ("latent", "text_fea"):
            if name in row:
                record[name] = row[name]
        lines.append(json.dumps(record, ensure_ascii=False))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
    return WriteResult([out], len(lines))


def load_tensor(path: str | os.PathLike) -> Any:
    """Load a pre-extracted ``latent``/``text_fea`` file with ``torch.load(weights_only=True)``: tensors
    and plain containers only; anything else is a ``FrameloomError``, never executed."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FrameloomError(
            f"{path} holds more than tensors; refused (loaded with weights_only=True): {first}"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise FrameloomError(f"cannot load tensor file {path}: {exc}") from None


def detect(source: Path) -> bool:
    """A .jsonl whose first record has ``video`` or ``image``."""
    if not (source.is_file() and source.suffix.lower() == ".jsonl"):
        return False
    with open(source, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and ("video" in first or "image" in first)
    return False


__all__ = ["detect", "load_tensor", "read_pyramid", "write_pyramid"]
