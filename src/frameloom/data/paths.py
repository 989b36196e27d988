"""Path safety for dataset files: which listed paths frameloom may open.

A dataset file names its media by path; such a file may come from anywhere (a download, a colleague), and an
entry like ``../../home/me/.ssh/id_rsa`` or a symlink that points out of the data folder would otherwise make
frameloom read (and, through the cache, encode and keep) a file the user never meant to hand over. The rules:

1. A **relative** path is taken from its root and must stay inside it: neither its ``..`` parts (lexically)
   nor a symlink on the way (the real file, every link followed) may lead out. This holds in every format and
   at every entry point (``prepare``, and the manifest that ``train``, ``cache`` and ``inspect`` load).
2. An **absolute** path is accepted as written in the formats whose tools write absolute paths (Open-Sora
   CSV/Parquet, Pyramid Flow jsonl, the manifest itself): there it is the norm, and it names exactly the file
   it names. In the formats that define a root for their entries (a folder and its caption tables,
   Open-Sora-Plan's ``DATA_ROOT``, CogVideoX's data root) an absolute path must lie under that root, like a
   relative one. ``strict`` (``--strict-roots``, ``data.strict_roots``) applies that rule to every format.
3. Extra roots (``--allow-root DIR``, ``data.extra_roots``) count as inside.

Anything else is rejected with reason ``outside_root``. ``resolve_entry`` checks one path; ``check_batch``
checks a column of them (one root), with one ``realpath`` and one ``scandir`` per distinct folder, which
also answers whether each file exists; the lookups are columnar (millions of rows in seconds).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

OUTSIDE_ROOT = "outside_root"
"""The reject reason for an entry whose file lies outside every allowed root."""


class OutsideRoot(Exception):
    """An entry that escapes its root; ``detail`` says where it leads."""

    def __init__(self, entry: str, detail: str):
        super().__init__(f"{entry}: {detail}")
        self.entry = entry
        self.detail = detail


@dataclass(frozen=True)
class PathRules:
    """What may be opened: ``extra_roots`` besides each entry's root, and ``strict`` (absolute paths must lie
    under a root in every format, not only in the formats that define one)."""

    extra_roots: tuple[Path, ...] = ()
    strict: bool = False

    @classmethod
    def make(cls, extra_roots: Iterable[str | os.PathLike] = (), strict: bool = False) -> PathRules:
        return cls(tuple(Path(r).expanduser() for r in extra_roots), bool(strict))

    def roots(self, root: str | os.PathLike) -> list[Path]:
        """The real (symlink-free, absolute) folders an entry of ``root`` may resolve into."""
        return allowed_roots(root, self.extra_roots)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _inside_text(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def allowed_roots(root: str | os.PathLike, extra_roots: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The real (symlink-free, absolute) folders an entry may resolve into: ``root`` and the extras."""
    return [Path(root).resolve()] + [Path(r).expanduser().resolve() for r in extra_roots]


def resolve_entry(
    root: str | os.PathLike,
    entry: str,
    extra_roots: Iterable[str | os.PathLike] = (),
    *,
    bound: bool = True,
) -> Path:
    """The absolute path of ``entry`` (relative to ``root``, or absolute), checked against the rules.

    ``bound``: whether an absolute entry must lie under a root too (formats that define a root, or strict
    rules; see the module doc). Returns the lexically normalised path (``a/./b/../c.mp4`` -> ``ROOT/a/c.mp4``;
    symlinked names are kept, so a folder of links stays a folder of links in the manifest); a path whose
    ``..`` passes through a symlink is returned resolved, since its lexical form would name another file.
    Raises ``OutsideRoot``; a missing file is not this function's concern (the probe reports it).
    """
    text = str(entry).strip()
    if not text:
        raise OutsideRoot(entry, "empty path")
    if "\0" in text:
        raise OutsideRoot(entry, "the path holds a NUL byte, which no file name can")
    given = Path(text).expanduser()
    candidate = given if given.is_absolute() else Path(root) / given
    lexical = Path(os.path.normpath(os.path.abspath(candidate)))
    if given.is_absolute() and not bound:
        return lexical
    roots = allowed_roots(root, extra_roots)
    lexical_roots = [Path(os.path.abspath(root))] + [
        Path(os.path.abspath(Path(r).expanduser())) for r in extra_roots
    ]
    if not given.is_absolute() and not any(_inside(lexical, r) for r in lexical_roots):
        raise OutsideRoot(entry, f"'..' leads to {lexical}, outside {lexical_roots[0]}" + _extra_note(roots))
    real = candidate.resolve()
    if not any(_inside(real, r) for r in roots):
        how = "a symlink" if real != lexical.resolve() or _is_link_chain(candidate) else "the path"
        raise OutsideRoot(entry, f"{how} leads to {real}, outside {roots[0]}" + _extra_note(roots))
    return lexical if lexical.resolve() == real else real


def _is_link_chain(path: Path) -> bool:
    """Whether any existing component of ``path`` is a symlink (for the reject's wording only)."""
    p = Path(os.path.abspath(path))
    for part in [p, *p.parents]:
        if part.is_symlink():
            return True
    return False


def _extra_note(roots: list[Path]) -> str:
    if len(roots) == 1:
        return " (allow another folder with --allow-root DIR or data.extra_roots)"
    return " and the allowed roots " + ", ".join(str(r) for r in roots[1:])


# ------------------------------------------------------------------------------------------- many at once

FILE, LINK, OTHER = 0, 1, 2


class FolderIndex:
    """What a set of folders holds, listed once each (``scandir``), with their real paths.

    ``listing(folder)`` is (names, kinds): FILE (a regular file), LINK (a symlink, to anything) or OTHER (a
    folder, a device); ``real(folder)`` is the folder's realpath. Millions of files are checked with one
    system call per folder instead of several per file, and the lookups are columnar (``check_batch``).
    """

    def __init__(self) -> None:
        self._listing: dict[str, tuple[list[str], list[int]]] = {}
        self._real: dict[str, str] = {}

    def listing(self, folder: str) -> tuple[list[str], list[int]]:
        found = self._listing.get(folder)
        if found is None:
            names: list[str] = []
            kinds: list[int] = []
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        try:
                            kind = (
                                LINK
                                if e.is_symlink()
                                else FILE
                                if e.is_file(follow_symlinks=False)
                                else OTHER
                            )
                        except OSError:
                            kind = OTHER
                        names.append(e.name)
                        kinds.append(kind)
            except OSError:
                pass
            found = self._listing[folder] = (names, kinds)
        return found

    def real(self, folder: str) -> str:
        real = self._real.get(folder)
        if real is None:
            real = self._real[folder] = os.path.realpath(folder)
        return real


@dataclass
class BatchCheck:
    """``check_batch``'s answer for N paths: ``files`` (absolute, normalised, as the manifest will name them;
    "" where a path could not be made one), ``status`` (0 ok, 1 outside_root, 2 missing, 3 not a regular
    file) and a detail per refused row."""

    files: pa.Array
    status: np.ndarray
    details: dict[int, str] = field(default_factory=dict)


OK, OUTSIDE, MISSING, NOT_FILE, BAD = 0, 1, 2, 3, 4
_DOTDOT = r"(^|/)\.\.(/|$)"
_NORM = r"(^|/)\.(/|$)|//|/$"


def _mask(values: Any) -> np.ndarray:
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), bool)


def _where(col: pa.Array, pattern: str, maybe: pa.Array) -> np.ndarray:
    """Rows matching the regex ``pattern``, which only rows of ``maybe`` (a cheap substring test) can."""
    out = _mask(maybe)
    rows = np.flatnonzero(out)
    if rows.size:
        out[rows] = _mask(pc.match_substring_regex(col.take(pa.array(rows)), pattern))
    return out


def check_batch(
    root: str | os.PathLike,
    paths: Sequence[str | None] | pa.Array | pa.ChunkedArray,
    rules: PathRules,
    *,
    bound: bool,
    index: FolderIndex | None = None,
) -> BatchCheck:
    """Check many entries of one ``root`` at once (see the module doc for the rules; ``bound`` as in
    ``resolve_entry``), and whether each names an existing regular file (symlinks followed).

    Columnar: paths are joined to the root, split into (folder, name) and looked up in the folders' listings
    by Arrow's hash lookup; Python runs per distinct folder, per symlink, and for the rare paths with ``..``
    or ``~`` parts (which go through ``resolve_entry``)."""
    index = index or FolderIndex()
    root_abs = os.path.normpath(os.path.abspath(os.fspath(root)))
    real_roots = [str(r) for r in rules.roots(root_abs)]
    note = _extra_note([Path(r) for r in real_roots])
    bound = bound or rules.strict
    col = paths if isinstance(paths, (pa.Array, pa.ChunkedArray)) else pa.array(list(paths), pa.string())
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    col = pc.utf8_trim_whitespace(col.cast(pa.string()))
    n = len(col)
    status = np.zeros(n, np.int8)
    details: dict[int, str] = {}
    nul = _mask(pc.match_substring(col, "\0"))  # no file name holds one (os calls would raise)
    for i in np.flatnonzero(nul).tolist():
        status[i], details[i] = BAD, "the path holds a NUL byte"
    col = pc.if_else(pa.array(nul), pa.scalar(None, pa.string()), col)
    empty = _mask(pc.or_(pc.is_null(col), pc.equal(col, ""))) & ~nul
    slow = _where(col, _DOTDOT, pc.match_substring(col, "..")) | _mask(pc.starts_with(col, "~"))
    slow &= ~empty
    absolute = _mask(pc.starts_with(col, "/"))
    full = pc.if_else(pa.array(absolute), col, pc.binary_join_element_wise(root_abs, col, "/"))
    maybe = pc.or_(
        pc.or_(pc.match_substring(full, "/."), pc.match_substring(full, "//")), pc.ends_with(full, "/")
    )
    needs_norm = _where(full, _NORM, maybe) & ~slow & ~empty
    files = full.to_pylist() if (needs_norm.any() or slow.any() or empty.any()) else None
    if files is not None:
        for i in np.flatnonzero(empty).tolist():
            files[i] = ""
            status[i], details[i] = OUTSIDE, "empty path"
        for i in np.flatnonzero(needs_norm).tolist():
            files[i] = os.path.normpath(files[i])
        for i in np.flatnonzero(slow).tolist():  # '..' may pass through a symlinked folder: one by one
            try:
                files[i] = str(resolve_entry(root_abs, col[i].as_py(), rules.extra_roots, bound=bound))
            except OutsideRoot as exc:
                files[i] = ""
                status[i], details[i] = OUTSIDE, exc.detail
                continue
            if not os.path.isfile(files[i]):
                status[i], details[i] = (
                    (NOT_FILE, "not a regular file")
                    if os.path.exists(files[i])
                    else (
                        MISSING,
                        "no such file",
                    )
                )
        full = pa.array(files, pa.string())
    # Folder and name of every path; each distinct folder is listed once.
    safe = pc.fill_null(full, "")
    safe = pc.if_else(pc.match_substring(safe, "/"), safe, "/")  # rows already refused: a placeholder
    split = pc.split_pattern(safe, "/", max_splits=1, reverse=True)
    folder = pc.list_element(split, 0)
    folder = pc.if_else(pc.equal(folder, ""), "/", folder)
    name = pc.list_element(split, 1)
    todo = (status == OK) & ~slow
    encoded = folder.dictionary_encode()
    folders = encoded.dictionary.to_pylist()
    which = encoded.indices.to_numpy(zero_copy_only=False)
    used = np.zeros(len(folders), bool)
    used[which[todo]] = True
    keys, kinds = [], []
    inside = np.ones(len(folders), bool)
    for k in np.flatnonzero(used).tolist():
        names, fkinds = index.listing(folders[k])
        keys.extend(f"{folders[k]}\0{x}" for x in names)
        kinds.extend(fkinds)
        inside[k] = _inside_text(index.real(folders[k]), real_roots)
    kind = np.full(n, -1, np.int64)
    if keys:
        joined = pc.binary_join_element_wise(folder, name, "\0")
        at = pc.index_in(joined, value_set=pa.array(keys, pa.string()))
        found = _mask(pc.is_valid(at)) & todo
        kind[found] = np.asarray(kinds, np.int64)[pc.fill_null(at, 0).to_numpy(zero_copy_only=False)[found]]
    folder_ok = inside[which]
    check_real = bound | ~absolute
    # 1. Missing and not-a-file; 2. a real folder outside the roots; 3. symlinks, one by one.
    for i in np.flatnonzero(todo & (kind == -1)).tolist():
        status[i], details[i] = MISSING, "no such file"
    for i in np.flatnonzero(todo & (kind == OTHER)).tolist():
        status[i], details[i] = NOT_FILE, "not a regular file"
    for i in np.flatnonzero(todo & (kind == FILE) & check_real & ~folder_ok).tolist():
        f, x = folder[i].as_py(), name[i].as_py()
        status[i] = OUTSIDE
        details[i] = f"a symlink leads to {index.real(f).rstrip('/')}/{x}, outside {real_roots[0]}{note}"
    for i in np.flatnonzero(todo & (kind == LINK)).tolist():
        path = full[i].as_py()
        real = os.path.realpath(path)
        if check_real[i] and not _inside_text(real, real_roots):
            status[i], details[i] = OUTSIDE, f"a symlink leads to {real}, outside {real_roots[0]}{note}"
        elif not os.path.isfile(real):
            status[i], details[i] = (
                (NOT_FILE, "not a regular file")
                if os.path.exists(real)
                else (
                    MISSING,
                    "a broken symlink",
                )
            )
    return BatchCheck(full, status, details)


__all__ = [
    "OUTSIDE_ROOT",
    "BatchCheck",
    "FolderIndex",
    "OutsideRoot",
    "PathRules",
    "allowed_roots",
    "check_batch",
    "resolve_entry",
]
