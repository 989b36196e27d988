"""Dataset dialects: one module per format, each mapping into and out of the canonical manifest.

``read_dialect(fmt, source)`` lists a source's entries (``base.Listing``), ``write_dialect(fmt, table, out,
base=...)`` writes a manifest table in a format, and ``detect_format(source)`` names the format of a source
for ``--format auto``. Formats: ``folder``, ``opensora``, ``opensora-plan``, ``cogvideox``, ``pyramid``,
``imagenet`` (class folders or a label table) and ``fastdit`` (pre-extracted features), only by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from frameloom.data.dialects import cogvideox, fastdit, folder, imagenet, opensora, opensora_plan, pyramid
from frameloom.data.dialects.base import Entry, Listing, WriteResult
from frameloom.data.paths import PathRules
from frameloom.errors import FrameloomError

DIALECTS: tuple[str, ...] = ("folder", "opensora", "opensora-plan", "cogvideox", "pyramid")
"""The seed systems' video dataset formats (auto-detected, convertible into each other)."""
CLASS_DIALECTS: tuple[str, ...] = ("imagenet", "fastdit")
"""Class-labelled image formats (MiniSora / fast-DiT), read only when named: ImageNet class folders or a
path/label table, and fast-DiT's pre-extracted features."""


def detect_format(source: str | os.PathLike) -> str:
    """The dialect of ``source``, from its layout (nothing is probed).

    Folders: ``prompts.txt`` + ``videos.txt`` -> cogvideox; only ``.parquet`` shards (no media) -> opensora;
    any other folder -> folder. Files: ``.csv``/``.parquet`` -> opensora; ``.jsonl`` with ``video``/``image``
    -> pyramid; a data.txt of ``ROOT,ANNOTATION`` lines, a ``.json`` list or a ``.pkl`` -> opensora-plan.
    """
    source = Path(source)
    if not source.exists():
        raise FrameloomError(f"source not found: {source}")
    if source.is_dir():
        if cogvideox.detect(source):
            return "cogvideox"
        has_media = any(p.suffix.lower() in folder.MEDIA_SUFFIXES for p in source.iterdir() if p.is_file())
        if opensora.detect(source) and not has_media:
            return "opensora"
        return "folder"
    if opensora.detect(source):
        return "opensora"
    if pyramid.detect(source):
        return "pyramid"
    if opensora_plan.detect(source):
        return "opensora-plan"
    raise FrameloomError(
        f"cannot tell the format of {source}; pass --format "
        "(folder, opensora, opensora-plan, cogvideox or pyramid)"
    )


def read_dialect(
    fmt: str, source: str | os.PathLike, *, allow_pickle: bool = False, rules: PathRules | None = None
) -> Listing:
    """The entries of ``source`` read as ``fmt`` (``auto`` detects it). ``rules`` are the path rules caption
    and listing files are checked with (media paths are ``prepare``'s to check)."""
    source = Path(source)
    if fmt == "auto":
        fmt = detect_format(source)
    if not source.exists():
        raise FrameloomError(f"source not found: {source}")
    if fmt == "folder":
        if not source.is_dir():
            raise FrameloomError(f"--format folder needs a folder, but {source} is a file")
        return folder.list_folder(source, rules)
    if fmt == "opensora":
        return opensora.read_opensora(source)
    if fmt == "opensora-plan":
        return opensora_plan.read_opensora_plan(source, allow_pickle=allow_pickle)
    if fmt == "cogvideox":
        return cogvideox.read_cogvideox(source, rules)
    if fmt == "pyramid":
        return pyramid.read_pyramid(source)
    if fmt == "imagenet":  # class folders or a path/label table (never auto-detected)
        return imagenet.read_imagenet(source)
    if fmt == "fastdit":  # fast-DiT's pre-extracted .npy features and labels (never auto-detected)
        return fastdit.read_fastdit(source)
    raise FrameloomError(f"unknown format {fmt!r}; expected one of {', '.join(DIALECTS + CLASS_DIALECTS)}")


def write_dialect(
    fmt: str,
    data: pa.Table | Iterable[pa.Table],
    out: str | os.PathLike,
    *,
    base: str | os.PathLike,
    **options: Any,
) -> WriteResult:
    """Write a manifest (a table, or validated slices of one; relative paths from ``base``) as ``fmt`` at
    ``out``. ``options``: ``memory_efficient`` and ``total_rows`` for opensora."""
    if options and fmt != "opensora":
        raise FrameloomError(f"{', '.join(options)}: only for --to opensora")
    writers = {
        "folder": folder.write_folder,
        "opensora": opensora.write_opensora,
        "opensora-plan": opensora_plan.write_opensora_plan,
        "cogvideox": cogvideox.write_cogvideox,
        "pyramid": pyramid.write_pyramid,
        "imagenet": imagenet.write_imagenet,
    }
    if fmt not in writers:
        raise FrameloomError(f"unknown format {fmt!r}; expected one of {', '.join(writers)}")
    return writers[fmt](data, out, base=base, **options)


def convert_manifest(
    manifest: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    *,
    memory_efficient: bool = False,
    rules: PathRules | None = None,
) -> WriteResult:
    """``frameloom convert``: write the manifest ``manifest`` in the dialect ``to`` at ``out``, slice by slice
    (a Parquet manifest is never all in memory). The manifest is validated and its paths checked
    (``manifest.check_paths``) as it is read."""
    from frameloom.data.manifest import check_paths, iter_manifest, manifest_rows

    manifest = Path(manifest)
    targets = (*DIALECTS, "imagenet")  # fastdit is read only: its features come from fast-DiT's extraction
    if to not in targets:
        raise FrameloomError(f"unknown format {to!r}; expected one of {', '.join(targets)}")
    if memory_efficient and to != "opensora":
        raise FrameloomError("--memory-efficient: only for --to opensora")

    def slices() -> Iterator[pa.Table]:
        row = 1
        for table in iter_manifest(manifest):
            check_paths(table, manifest, rules, first_row=row)
            row += table.num_rows
            yield table

    options: dict[str, Any] = {}
    if memory_efficient:
        options = {"memory_efficient": True, "total_rows": manifest_rows(manifest)}
    return write_dialect(to, slices(), out, base=manifest.resolve().parent, **options)


__all__ = [
    "CLASS_DIALECTS",
    "DIALECTS",
    "convert_manifest",
    "Entry",
    "Listing",
    "WriteResult",
    "detect_format",
    "read_dialect",
    "write_dialect",
]
