"""The Open-Sora-Plan (v1.3) dialect: ``data.txt`` naming annotation files, each a JSON list of records.

``data.txt`` has one ``DATA_ROOT,ANNOTATION`` line per annotation file; a record's file is
``DATA_ROOT/path``. Record fields (SEED_FACTS.md; v1.3 ``opensora/dataset/t2v_datasets.py``) and their
manifest columns:

=====================  ==========================================================================
``path``               ``path`` (relative to DATA_ROOT)
``cap``                ``text`` (the first caption) and, with several, ``captions`` (the list); a string is one
``resolution``         ``{height, width}`` -> ``height``, ``width``
``num_frames``         the sample's frames **from** ``cut[0]`` (see below)
``fps``                ``fps``
``aesthetic``/``aes``  ``aesthetic``
``cut``                ``[start, end]`` -> ``cut_start`` = start (``end`` is not read, as in the seed)
``crop``               ``[x0, x1, y0, y1]`` -> ``crop``
``tech``               ``tech``
``motion``/``motion_average``  ``motion``
=====================  ==========================================================================

Frames, as the seed reads them: the sample is frames ``arange(cut[0], cut[0] + num_frames)`` of the file
(``cut[0]`` is 0 without a cut), so a record maps to ``cut_start = cut[0]`` and ``cut_end = cut[0] +
num_frames``; the file must hold at least ``cut_end`` frames (``prepare`` checks it against the probe, or
takes ``cut_end`` as the file's frame count under ``--trust-metadata``). A record without a cut gives
``num_frames`` (the whole file). The writer does the reverse: ``num_frames = cut_end - cut_start`` and
``cut = [cut_start, cut_end]``, so the seed reads the same frames back.

Images are records whose path is an image (the seed: ``.jpg``; it refuses other suffixes). Other record keys
are not carried. Relative DATA_ROOT and ANNOTATION paths are taken from data.txt's folder (the seed takes
them from the working directory). A record value of the wrong type (``"num_frames": "many"``, a ``cut`` that
is not two numbers) is one error naming the annotation file, the record and the field. Annotations may be
pickles in the seed; loading a pickle runs whatever code it names, so they are read only with
``allow_pickle=True`` (``--allow-pickle``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from frameloom.data.coerce import INT_LIMIT, CellError
from frameloom.data.dialects.base import (
    BAD_ENTRY,
    Listing,
    Part,
    WriteResult,
    json_objects,
    json_values,
    read_text,
    rebased_paths,
    table_slices,
    typed_table,
)
from frameloom.data.paths import OutsideRoot, resolve_entry
from frameloom.errors import FrameloomError

PICKLE_SUFFIXES = (".pkl", ".pickle")
ANNOTATION_SUFFIXES = (".json", *PICKLE_SUFFIXES)
# What the seed's loader accepts (anything else raises NameError there).
SEED_VIDEO_SUFFIX, SEED_IMAGE_SUFFIX = ".mp4", ".jpg"
FIELDS = ("text", "captions", "height", "width", "num_frames", "fps", "aesthetic", "cut_start", "cut_end",
          "crop", "tech", "motion")  # fmt: skip


def read_data_txt(path: str | os.PathLike) -> list[tuple[Path, Path]]:
    """``(DATA_ROOT, ANNOTATION)`` pairs of a data.txt, relative ones taken from its folder."""
    path = Path(path)
    pairs = []
    for number, line in enumerate(read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise FrameloomError(
                f"{path}, line {number}: expected DATA_ROOT,ANNOTATION (two paths, no other comma)"
            )
        root, anno = (Path(p.strip()).expanduser() for p in parts)
        if not anno.is_absolute():
            try:
                resolve_entry(path.parent, str(anno), bound=False)
            except OutsideRoot as exc:
                raise FrameloomError(f"{path}, line {number}: annotation {exc.detail}") from None
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
        try:
            with open(path, "rb") as fh:
                data = pickle.load(fh)  # noqa: S301 - the user allowed it explicitly
        except Exception as exc:  # noqa: BLE001 - a broken pickle can raise anything
            raise FrameloomError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from None
    else:
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise FrameloomError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
        except RecursionError:
            raise FrameloomError(f"{path}: not JSON (nested too deeply)") from None
    if not isinstance(data, list):
        raise FrameloomError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


class _Bad(Exception):
    def __init__(self, name: str, problem: str):
        super().__init__(problem)
        self.name, self.problem = name, problem


def _number(name: str, value: Any, whole: bool = False) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(name, f"{value!r} is not a number")
    if whole:
        if not (math.isfinite(value) and value == int(value) and abs(value) <= INT_LIMIT):
            raise _Bad(name, f"{value!r} is not a whole number")
        return int(value)
    return float(value)


def _pair(name: str, value: Any, size: int) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != size:
        raise _Bad(name, f"{value!r} is not a list of {size} numbers")
    return [_number(name, v, whole=True) for v in value]


def record_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A record's manifest columns (see the module table). Raises ``_Bad`` for a value of the wrong type."""
    fields: dict[str, Any] = {}
    cap = record.get("cap")
    if isinstance(cap, str):
        cap = [cap]
    if cap is not None and (not isinstance(cap, list) or not all(isinstance(c, str) for c in cap)):
        raise _Bad("cap", f"{cap!r} is not a caption or a list of captions")
    fields["text"] = cap[0] if cap else ""
    if cap and len(cap) > 1:  # one caption is just ``text``; the list is kept when there is a choice
        fields["captions"] = list(cap)
    resolution = record.get("resolution")
    if resolution is not None:
        if not isinstance(resolution, dict):
            raise _Bad("resolution", f"{resolution!r} is not {{height, width}}")
        for key in ("height", "width"):
            fields[key] = _number(f"resolution.{key}", resolution.get(key), whole=True)
    frames = _number("num_frames", record.get("num_frames"), whole=True)
    fields["fps"] = _number("fps", record.get("fps"))
    fields["aesthetic"] = _number("aesthetic", record.get("aesthetic", record.get("aes")))
    cut = _pair("cut", record.get("cut"), 2)
    crop = _pair("crop", record.get("crop"), 4)
    if cut is not None:
        # The seed reads frames [cut[0], cut[0] + num_frames); the file holds at least cut_end frames.
        fields["cut_start"] = cut[0]
        if frames is not None:
            fields["cut_end"] = cut[0] + frames
            frames = cut[0] + frames
    fields["num_frames"] = frames
    fields["crop"] = crop
    fields["tech"] = _number("tech", record.get("tech"))
    fields["motion"] = _number("motion", record.get("motion", record.get("motion_average")))
    return fields


def _part(root: Path, anno: Path, records: list[Any], rejects: list[tuple[str, str, str]]) -> Part:
    paths: list[str] = []
    columns: dict[str, list[Any]] = {name: [] for name in FIELDS}
    for number, record in enumerate(records, 1):
        path = record.get("path") if isinstance(record, dict) else None
        if not isinstance(path, str) or not path.strip():
            rejects.append((f"{anno.name}:{number}", BAD_ENTRY, f"record {number} of {anno} has no path"))
            continue
        try:
            fields = record_fields(record)
        except _Bad as exc:
            raise FrameloomError(f"{anno}, record {number}, field {exc.name!r}: {exc.problem}") from None
        paths.append(path)
        for name in FIELDS:
            columns[name].append(fields.get(name))
    try:
        table = typed_table({"path": paths, **columns}, source=str(anno))
    except CellError as exc:
        raise FrameloomError(str(exc)) from None
    return Part(root, table, str(anno))


def read_opensora_plan(source: str | os.PathLike, *, allow_pickle: bool = False) -> Listing:
    """List an Open-Sora-Plan data set: a data.txt, or one annotation file (its folder is the root)."""
    source = Path(source)
    if source.suffix.lower() in ANNOTATION_SUFFIXES:
        pairs = [(source.parent, source)]
    else:
        pairs = read_data_txt(source)
    rejects: list[tuple[str, str, str]] = []

    def parts() -> Iterator[Part]:
        for root, anno in pairs:
            yield _part(root, anno, load_annotation(anno, allow_pickle=allow_pickle), rejects)

    return Listing(parts(), bound=True, rejects=rejects)


def _int(col: Any) -> np.ndarray:
    return pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _records(table: pa.Table) -> pa.Array:
    """Record text (JSON) per row of a manifest slice whose paths are already rebased, column by column
    (see the module doc for the mapping)."""
    n = table.num_rows
    names = table.column_names

    def col(name: str, fill: Any = None) -> Any:
        if name in names:
            return table.column(name)
        return pa.nulls(n) if fill is None else pa.array([fill] * n)

    image = np.asarray(pc.fill_null(col("is_image", False), False).to_numpy(zero_copy_only=False), bool)
    text = json_values(pc.fill_null(col("text", ""), ""))
    cap = pc.binary_join_element_wise("[", text, "]", "")
    if "captions" in names:  # several captions: the whole list
        many = pc.fill_null(pc.greater(pc.list_value_length(table.column("captions")), 1), False)
        cap = pc.if_else(many, json_values(table.column("captions")), cap)
    height, width = pc.cast(col("height"), pa.string()), pc.cast(col("width"), pa.string())
    resolution = pc.binary_join_element_wise('{"height": ', height, ', "width": ', width, "}", "")
    has_cut = ~image & (_valid(table, "cut_start") | _valid(table, "cut_end"))
    frames = _int(col("num_frames", 0))
    start = np.where(has_cut, _int(col("cut_start", 0)), 0)
    end = np.where(_valid(table, "cut_end"), _int(col("cut_end", 0)), frames)
    count = np.where(has_cut, end - start, frames)  # the seed counts num_frames from cut[0]
    video = pa.array(~image)
    fps = col("fps") if "fps" in names else pa.nulls(n, pa.float64())
    known = pc.fill_null(pc.greater(fps, 0), False)
    cut = pc.binary_join_element_wise("[", pc.cast(pa.array(start), pa.string()), ", ",
                                      pc.cast(pa.array(end), pa.string()), "]", "")  # fmt: skip
    none = pa.scalar(None, pa.string())
    fields = [
        ("path", json_values(col("path"))),
        ("cap", cap),
        ("resolution", resolution),
        ("num_frames", pc.if_else(video, pc.cast(pa.array(count), pa.string()), none)),
        ("fps", pc.if_else(pc.and_(video, known), json_values(pc.cast(fps, pa.float64())), none)),
        ("aesthetic", json_values(pc.cast(col("aesthetic"), pa.float64()))),
        ("cut", pc.if_else(pa.array(has_cut), cut, none)),
        ("crop", json_values(col("crop")) if "crop" in names else pa.nulls(n, pa.string())),
        ("tech", json_values(pc.cast(col("tech"), pa.float64()))),
        ("motion", json_values(pc.cast(col("motion"), pa.float64()))),
    ]
    return json_objects(fields)


def _valid(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(table.num_rows, bool)
    return np.asarray(pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False), bool)


def write_opensora_plan(
    data: pa.Table | Iterable[pa.Table], out: str | os.PathLike, *, base: str | os.PathLike
) -> WriteResult:
    """Write ``out`` (a data.txt; a folder gets ``data.txt``) and its annotation ``<stem>.json`` beside it.

    DATA_ROOT is data.txt's folder, written absolute (the seed reads it from its working directory); record
    paths are relative to it when the media lie under it, else absolute. A video without a known frame rate
    gets no ``fps`` (the seed then assumes 24). Notes count the rows whose suffix the seed's loader would
    refuse (it reads .mp4 videos and .jpg images only). Written slice by slice.
    """
    out, base = Path(out), Path(base)
    if out.is_dir() or not out.suffix:
        out = out / "data.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    root = out.parent.resolve()
    anno = root / f"{out.stem}.json"
    if "," in str(root) or "," in str(anno):
        raise FrameloomError(f"Open-Sora-Plan's data.txt cannot hold a path with a comma: {anno}")
    tmp = anno.with_name(anno.name + ".tmp")
    count, unreadable, no_fps = 0, 0, 0
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("[")
        for table in table_slices(data):
            if table.num_rows == 0:
                continue
            suffix = pc.utf8_lower(
                pc.struct_field(pc.extract_regex(table.column("path"), r"(?P<s>\.[^./]*)$"), "s")
            )
            is_image = (
                table.column("is_image")
                if "is_image" in table.column_names
                else pa.nulls(table.num_rows, pa.bool_())
            )
            want = pc.if_else(pc.fill_null(is_image, False), SEED_IMAGE_SUFFIX, SEED_VIDEO_SUFFIX)
            unreadable += int(pc.sum(pc.invert(pc.fill_null(pc.equal(suffix, want), False))).as_py() or 0)
            if "fps" in table.column_names:
                unknown = pc.or_(
                    pc.is_null(table.column("fps")), pc.less_equal(pc.fill_null(table.column("fps"), 0), 0)
                )
                no_fps += int(pc.sum(pc.and_(unknown, pc.invert(pc.fill_null(is_image, False)))).as_py() or 0)
            for name in ("path", "latent", "text_fea", "condition_image"):
                if name in table.column_names:
                    table = table.set_column(
                        table.column_names.index(name), name, rebased_paths(table.column(name), base, root)
                    )
            records = _records(table).to_pylist()
            fh.write(("\n" if count == 0 else ",\n") + ",\n".join(records))
            count += len(records)
        fh.write("\n]\n")
    os.replace(tmp, anno)
    out.write_text(f"{root},{anno}\n", encoding="utf-8")
    notes = []
    if unreadable:
        notes.append(
            f"{unreadable} rows have a suffix Open-Sora-Plan's loader refuses (it reads .mp4 videos and .jpg "
            "images only; frameloom reads them all)"
        )
    if no_fps:
        notes.append(f"{no_fps} videos have no known frame rate and no 'fps' (Open-Sora-Plan assumes 24)")
    return WriteResult([out, anno], count, notes)


def detect(source: Path) -> bool:
    """A .json annotation list, a .pkl, or a .txt whose first line is ``ROOT,ANNOTATION.json|pkl``."""
    if not source.is_file():
        return False
    suffix = source.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return True
    if suffix == ".json":
        with open(source, encoding="utf-8", errors="replace") as fh:
            return fh.read(4096).lstrip("\ufeff \t\r\n").startswith("[")
    if suffix == ".txt":
        with open(source, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    parts = line.strip().split(",")
                    return len(parts) == 2 and parts[1].strip().lower().endswith(ANNOTATION_SUFFIXES)
    return False


__all__ = [
    "detect",
    "load_annotation",
    "read_data_txt",
    "read_opensora_plan",
    "record_fields",
    "write_opensora_plan",
]
