"""The Open-Sora-Plan (v1.3) dialect: ``data.txt`` naming annotation files, each a JSON list of records.

``data.txt`` has one ``DATA_ROOT,ANNOTATION`` line per annotation file; a record's file is
``DATA_ROOT/path``. Record fields (SEED_FACTS.md) and their manifest columns:

=====================  ==========================================================================
``path``               ``path`` (relative to DATA_ROOT)
``cap``                ``text`` (the first caption) and, with several, ``captions`` (the list); a string is one
``resolution``         ``{height, width}`` -> ``height``, ``width``
``num_frames``, ``fps`` the same names (``num_frames``: frames of the file)
``aesthetic``/``aes``  ``aesthetic``
``cut``                ``[start, end]`` -> ``cut_start``, ``cut_end`` (frame indices)
``crop``               ``[x0, x1, y0, y1]`` -> ``crop``
``tech``               ``tech``
``motion``/``motion_average``  ``motion``
=====================  ==========================================================================

Images are records whose path is an image (the seed: ``.jpg``; it refuses other suffixes). Other record keys
are not carried. Relative DATA_ROOT and ANNOTATION paths are taken from data.txt's folder (the seed takes
them from the working directory). Annotations may be pickles in the seed; loading a pickle runs whatever
code it names, so they are read only with ``allow_pickle=True`` (``--allow-pickle``).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pyarrow as pa

from frameloom.data.dialects.base import BAD_ENTRY, Entry, Listing, WriteResult, rebase, table_rows
from frameloom.errors import FrameloomError

PICKLE_SUFFIXES = (".pkl", ".pickle")
ANNOTATION_SUFFIXES = (".json", *PICKLE_SUFFIXES)
# What the seed's loader accepts (anything else raises NameError there).
SEED_VIDEO_SUFFIX, SEED_IMAGE_SUFFIX = ".mp4", ".jpg"


def read_data_txt(path: str | os.PathLike) -> list[tuple[Path, Path]]:
    """``(DATA_ROOT, ANNOTATION)`` pairs of a data.txt, relative ones taken from its folder."""
    path = Path(path)
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise FrameloomError(
                f"{path}, line {number}: expected DATA_ROOT,ANNOTATION (two paths, no other comma)"
            )
        root, anno = (Path(p.strip()).expanduser() for p in parts)
        pairs.append(
            (
                root if root.is_absolute() else path.parent / root,
                anno if anno.is_absolute() else path.parent / anno,
            )
        )
    return pairs


def load_annotation(path: Path, *, allow_pickle: bool = False) -> list[Any]:
    """An annotation file's records: a JSON list, or (only with ``allow_pickle``) a pickled list."""
    if not path.is_file():
        raise FrameloomError(f"annotation file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FrameloomError(
                f"{path} is a pickle; loading a pickle can run arbitrary code. Convert it to JSON, or pass "
                "--allow-pickle (allow_pickle=True) only if you trust where it came from"
            )
        with open(path, "rb") as fh:
            data = pickle.load(fh)  # noqa: S301 - the user allowed it explicitly
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FrameloomError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, list):
        raise FrameloomError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _number(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def record_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A record's manifest columns (see the module table); absent or malformed values are left out."""
    fields: dict[str, Any] = {}
    cap = record.get("cap")
    if isinstance(cap, str):
        cap = [cap]
    if isinstance(cap, list) and cap:
        fields["text"] = str(cap[0])
        if len(cap) > 1:  # one caption is just ``text``; the list is kept when there is a choice
            fields["captions"] = [str(c) for c in cap]
    else:
        fields["text"] = ""
    resolution = record.get("resolution")
    if isinstance(resolution, dict):
        for key in ("height", "width"):
            if _number(resolution.get(key)) is not None:
                fields[key] = int(resolution[key])
    if _number(record.get("num_frames")) is not None:
        fields["num_frames"] = int(record["num_frames"])
    if _number(record.get("fps")) is not None:
        fields["fps"] = float(record["fps"])
    aesthetic = record.get("aesthetic", record.get("aes"))
    if _number(aesthetic) is not None:
        fields["aesthetic"] = float(aesthetic)
    cut = record.get("cut")
    if isinstance(cut, (list, tuple)) and len(cut) == 2 and all(_number(c) is not None for c in cut):
        fields["cut_start"], fields["cut_end"] = int(cut[0]), int(cut[1])
    crop = record.get("crop")
    if isinstance(crop, (list, tuple)) and len(crop) == 4 and all(_number(c) is not None for c in crop):
        fields["crop"] = [int(c) for c in crop]
    if _number(record.get("tech")) is not None:
        fields["tech"] = float(record["tech"])
    motion = record.get("motion", record.get("motion_average"))
    if _number(motion) is not None:
        fields["motion"] = float(motion)
    return fields


def read_opensora_plan(source: str | os.PathLike, *, allow_pickle: bool = False) -> Listing:
    """List an Open-Sora-Plan data set: a data.txt, or one annotation file (its folder is the root)."""
    source = Path(source)
    if source.suffix.lower() in ANNOTATION_SUFFIXES:
        pairs = [(source.parent, source)]
    else:
        pairs = read_data_txt(source)
    entries: list[Entry] = []
    rejects: list[tuple[str, str, str]] = []
    for root, anno in pairs:
        for number, record in enumerate(load_annotation(anno, allow_pickle=allow_pickle), 1):
            path = record.get("path") if isinstance(record, dict) else None
            if not isinstance(path, str) or not path.strip():
                rejects.append((f"{anno.name}:{number}", BAD_ENTRY, f"record {number} of {anno} has no path"))
                continue
            entries.append(Entry(root=root, path=path, fields=record_fields(record)))
    return Listing(entries, rejects)


def _record(row: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"path": row["path"]}
    captions = row.get("captions") or [row.get("text") or ""]
    record["cap"] = list(captions)
    record["resolution"] = {"height": int(row["height"]), "width": int(row["width"])}
    if not row.get("is_image"):
        record["num_frames"] = int(row["num_frames"])
        record["fps"] = float(row["fps"])
    if "aesthetic" in row:
        record["aesthetic"] = float(row["aesthetic"])
    if "cut_start" in row or "cut_end" in row:
        start = int(row.get("cut_start", 0))
        record["cut"] = [start, int(row.get("cut_end", row["num_frames"]))]
    if "crop" in row:
        record["crop"] = [int(c) for c in row["crop"]]
    for name in ("tech", "motion"):
        if name in row:
            record[name] = float(row[name])
    return record


def write_opensora_plan(table: pa.Table, out: str | os.PathLike, *, base: str | os.PathLike) -> WriteResult:
    """Write ``out`` (a data.txt; a folder gets ``data.txt``) and its annotation ``<stem>.json`` beside it.

    DATA_ROOT is data.txt's folder, written absolute (the seed reads it from its working directory); record
    paths are relative to it when the media lie under it, else absolute. Notes count the rows whose suffix
    the seed's loader would refuse (it reads .mp4 videos and .jpg images only).
    """
    out, base = Path(out), Path(base)
    if out.is_dir() or not out.suffix:
        out = out / "data.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    root = out.parent.resolve()
    anno = root / f"{out.stem}.json"
    if "," in str(root) or "," in str(anno):
        raise FrameloomError(f"Open-Sora-Plan's data.txt cannot hold a path with a comma: {anno}")
    records, unreadable = [], 0
    for row in table_rows(table, base):
        record = _record(rebase(row, root))
        suffix = Path(row["path"]).suffix.lower()
        if suffix != (SEED_IMAGE_SUFFIX if row.get("is_image") else SEED_VIDEO_SUFFIX):
            unreadable += 1
        records.append(record)
    tmp = anno.with_name(anno.name + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, anno)
    out.write_text(f"{root},{anno}\n", encoding="utf-8")
    notes = []
    if unreadable:
        notes.append(
            f"{unreadable} rows have a suffix Open-Sora-Plan's loader refuses (it reads .mp4 videos and .jpg "
            "images only; frameloom reads them all)"
        )
    return WriteResult([out, anno], len(records), notes)


def detect(source: Path) -> bool:
    """A .json annotation list, a .pkl, or a .txt whose first line is ``ROOT,ANNOTATION.json|pkl``."""
    if not source.is_file():
        return False
    suffix = source.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return True
    if suffix == ".json":
        with open(source, encoding="utf-8", errors="replace") as fh:
            return fh.read(4096).lstrip().startswith("[")
    if suffix == ".txt":
        with open(source, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    parts = line.strip().split(",")
                    return len(parts) == 2 and parts[1].strip().lower().endswith(ANNOTATION_SUFFIXES)
    return False


__all__ = ["detect", "load_annotation", "read_data_txt", "read_opensora_plan", "write_opensora_plan"]
