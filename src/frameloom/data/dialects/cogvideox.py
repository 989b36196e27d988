"""The CogVideoX fine-tuning dialect: a data root with ``prompts.txt``, ``videos.txt`` and, for
image-to-video, ``images.txt``; line i of each file describes sample i, paths relative to the root
(SEED_FACTS.md).

Lines are read as the seed reads them (``finetune/datasets/utils.py``: ``open(..., "r")`` then
``readlines()``, ``strip()``, lines empty after stripping skipped): split at ``\\n``, ``\\r\\n`` and ``\\r``
only (Python's universal newlines; not at U+2028, form feeds or the other breaks ``str.splitlines`` knows,
which would shift every following caption onto the wrong video), then stripped of surrounding whitespace.

Writing: a caption goes on one line (a line break inside it becomes a space). An empty caption (an
unconditional sample) cannot be an empty line, since the seed skips those and would pair every later caption
with the wrong video; it is written as a single U+200B ZERO WIDTH SPACE, which ``strip()`` keeps (so the seed
keeps the line) and T5's SentencePiece normalization (``nmt_nfkc``) removes (so the seed's text encoder sees
the empty prompt). Reading maps such a line back to "". The files are UTF-8; anything else is one error line.

The manifest column ``condition_image`` holds an ``images.txt`` entry (the first-frame condition of I2V).
Images are not samples in this format (CogVideoX trains on videos); a writer leaves image rows out and says
how many. A listing file (``prompts.txt``, ...) that is a symlink out of the root is refused, like media.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from frameloom.data.coerce import CellError
from frameloom.data.dialects.base import (
    Listing,
    Part,
    WriteResult,
    one_line,
    read_text,
    rebased_paths,
    table_slices,
    typed_table,
)
from frameloom.data.paths import OutsideRoot, PathRules, resolve_entry
from frameloom.errors import FrameloomError

PROMPTS, VIDEOS, IMAGES = "prompts.txt", "videos.txt", "images.txt"
EMPTY_CAPTION = "\u200b"
"""How an empty caption is written (see the module doc)."""


def seed_lines(text: str) -> list[str]:
    """The seed's lines of a file's text: split at \\n, \\r\\n, \\r; stripped; empty ones skipped."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [line.strip() for line in lines if line.strip()]


def _lines(root: Path, name: str, rules: PathRules) -> list[str]:
    try:
        resolve_entry(root, name, rules.extra_roots, bound=True)
    except OutsideRoot as exc:
        raise FrameloomError(
            f"{root / name}: {exc.detail}; listing files obey the same path rules as media"
        ) from None
    return seed_lines(read_text(root / name))


def read_cogvideox(root: str | os.PathLike, rules: PathRules | None = None) -> Listing:
    """List a CogVideoX data root. The files must have the same number of entries."""
    root = Path(root)
    rules = rules or PathRules()
    for name in (PROMPTS, VIDEOS):
        if not (root / name).is_file():
            raise FrameloomError(f"{root} is not a CogVideoX data root: {name} is missing")
    prompts, videos = _lines(root, PROMPTS, rules), _lines(root, VIDEOS, rules)
    images = _lines(root, IMAGES, rules) if (root / IMAGES).is_file() else None
    if len(prompts) != len(videos):
        raise FrameloomError(
            f"{root}: {PROMPTS} has {len(prompts)} entries but {VIDEOS} has {len(videos)}; line i of each "
            "describes sample i"
        )
    if images is not None and len(images) != len(videos):
        raise FrameloomError(f"{root}: {IMAGES} has {len(images)} entries but {VIDEOS} has {len(videos)}")
    columns = {"path": videos, "text": ["" if p == EMPTY_CAPTION else p for p in prompts]}
    if images is not None:
        columns["condition_image"] = images
    try:
        table = typed_table(columns, source=str(root))
    except CellError as exc:
        raise FrameloomError(str(exc)) from None
    return Listing([Part(root, table, str(root / VIDEOS))], bound=True)


def write_cogvideox(
    data: pa.Table | Iterable[pa.Table], out: str | os.PathLike, *, base: str | os.PathLike
) -> WriteResult:
    """Write prompts.txt, videos.txt (and images.txt when every row has a ``condition_image``) into the
    folder ``out``; paths relative to it when the media lie under it, else absolute. Slice by slice."""
    out, base = Path(out), Path(base)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in (PROMPTS, VIDEOS, IMAGES)}
    tmps = {
        name: open(f.with_name(f.name + ".tmp"), "w", encoding="utf-8", newline="\n")
        for name, f in files.items()
    }
    rows, skipped, with_image = 0, 0, 0
    try:
        for table in table_slices(data):
            if table.num_rows == 0:
                continue
            if "is_image" in table.column_names:
                image = pc.fill_null(table.column("is_image"), False)
                skipped += int(pc.sum(image).as_py() or 0)
                table = table.filter(pc.invert(image))
            if table.num_rows == 0:
                continue
            paths = rebased_paths(table.column("path"), base, out).to_pylist()
            bad = [p for p in paths if "\n" in p or "\r" in p or p != p.strip()]
            if bad:
                raise FrameloomError(
                    f"{bad[0]!r}: CogVideoX's videos.txt cannot hold a path with a line break or surrounding spaces"
                )
            texts = (
                table.column("text").to_pylist() if "text" in table.column_names else [""] * table.num_rows
            )
            captions = [one_line(t).strip() or EMPTY_CAPTION for t in texts]
            tmps[PROMPTS].write("".join(f"{c}\n" for c in captions))
            tmps[VIDEOS].write("".join(f"{p}\n" for p in paths))
            if "condition_image" in table.column_names:
                images = rebased_paths(table.column("condition_image"), base, out).to_pylist()
                with_image += sum(i is not None for i in images)
                tmps[IMAGES].write("".join(f"{i}\n" for i in images if i is not None))
            rows += len(paths)
    finally:
        for fh in tmps.values():
            fh.close()
    written = [files[PROMPTS], files[VIDEOS]]
    notes = []
    keep_images = rows > 0 and with_image == rows
    if with_image and not keep_images:
        notes.append("condition images left out: only some rows have one, and images.txt needs one per line")
    for name in (PROMPTS, VIDEOS, IMAGES):
        tmp = files[name].with_name(files[name].name + ".tmp")
        if name == IMAGES and not keep_images:
            tmp.unlink()
            if files[name].exists():
                files[name].unlink()  # a stale images.txt would pair the new videos with old images
            continue
        os.replace(tmp, files[name])
    if keep_images:
        written.append(files[IMAGES])
    if skipped:
        notes.append(f"{skipped} image rows left out (CogVideoX's videos.txt lists videos)")
    return WriteResult(written, rows, notes)


def detect(source: Path) -> bool:
    """A folder holding prompts.txt and videos.txt."""
    return source.is_dir() and (source / PROMPTS).is_file() and (source / VIDEOS).is_file()


__all__ = ["EMPTY_CAPTION", "detect", "read_cogvideox", "seed_lines", "write_cogvideox"]
