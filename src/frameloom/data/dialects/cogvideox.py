"""The CogVideoX fine-tuning dialect: a data root with ``prompts.txt``, ``videos.txt`` and, for
image-to-video, ``images.txt``; one entry per line, line i of each file describing sample i, paths relative
to the root (SEED_FACTS.md). Empty lines are skipped, as the seed's loader skips them.

The manifest column ``condition_image`` holds an ``images.txt`` entry (the first-frame condition of I2V).
Captions are written on one line each (a newline inside a caption becomes a space). Images are not samples
in this format (CogVideoX trains on videos); a writer leaves image rows out and says how many.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from frameloom.data.dialects.base import Entry, Listing, WriteResult, one_line, rebase, table_rows
from frameloom.errors import FrameloomError

PROMPTS, VIDEOS, IMAGES = "prompts.txt", "videos.txt", "images.txt"


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_cogvideox(root: str | os.PathLike) -> Listing:
    """List a CogVideoX data root. The files must have the same number of entries."""
    root = Path(root)
    for name in (PROMPTS, VIDEOS):
        if not (root / name).is_file():
            raise FrameloomError(f"{root} is not a CogVideoX data root: {name} is missing")
    prompts, videos = _lines(root / PROMPTS), _lines(root / VIDEOS)
    images = _lines(root / IMAGES) if (root / IMAGES).is_file() else None
    if len(prompts) != len(videos):
        raise FrameloomError(
            f"{root}: {PROMPTS} has {len(prompts)} entries but {VIDEOS} has {len(videos)}; line i of each "
            "describes sample i"
        )
    if images is not None and len(images) != len(videos):
        raise FrameloomError(f"{root}: {IMAGES} has {len(images)} entries but {VIDEOS} has {len(videos)}")
    entries = []
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        fields = {"text": prompt}
        if images is not None:
            fields["condition_image"] = images[i]
        entries.append(Entry(root=root, path=video, fields=fields))
    return Listing(entries)


def write_cogvideox(table: pa.Table, out: str | os.PathLike, *, base: str | os.PathLike) -> WriteResult:
    """Write prompts.txt, videos.txt (and images.txt when every row has a ``condition_image``) into the
    folder ``out``; paths relative to it when the media lie under it, else absolute."""
    out, base = Path(out), Path(base)
    out.mkdir(parents=True, exist_ok=True)
    prompts, videos, images, skipped = [], [], [], 0
    for row in table_rows(table, base):
        if row.get("is_image"):
            skipped += 1
            continue
        row = rebase(row, out)
        prompts.append(one_line(row.get("text")))
        videos.append(row["path"])
        images.append(row.get("condition_image"))
    files = [out / PROMPTS, out / VIDEOS]
    contents = [prompts, videos]
    notes = []
    if images and all(i is not None for i in images):
        files.append(out / IMAGES)
        contents.append(images)
    elif any(i is not None for i in images):
        notes.append("condition images left out: only some rows have one, and images.txt needs one per line")
    if out / IMAGES not in files and (out / IMAGES).exists():
        (out / IMAGES).unlink()  # a stale images.txt would pair the new videos with old images
    for file, lines in zip(files, contents):
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        os.replace(tmp, file)
    if skipped:
        notes.append(f"{skipped} image rows left out (CogVideoX's videos.txt lists videos)")
    return WriteResult(files, len(videos), notes)


def detect(source: Path) -> bool:
    """A folder holding prompts.txt and videos.txt."""
    return source.is_dir() and (source / PROMPTS).is_file() and (source / VIDEOS).is_file()


__all__ = ["detect", "read_cogvideox", "write_cogvideox"]
