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
checks a column of them (one root), with one ``realpath`` per distinct folder and one ``scandir`` per
folder, which also answers whether each file exists (millions of rows in seconds).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OUTSIDE_ROOT = "outside_root"
"""The reject reason for an entry whose file lies outside every allowed root."""

# A path whose text needs os.path.normpath: "." or ".." parts, doubled or trailing slashes.
_NEEDS_NORM = re.compile(r"(^|/)\.{1,2}(/|$)|//|/$")


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

FILE, LINK, OTHER, ABSENT = 0, 1, 2, 3


class FolderIndex:
    """What a set of folders holds, listed once each (``scandir``), with their real paths.

    ``kind(folder, name)`` is FILE (a regular file), LINK (a symlink, to anything), OTHER (a folder, a device)
    or ABSENT; ``real(folder)`` is the folder's realpath. Millions of files are checked with one system call
    per folder instead of several per file.
    """

    def __init__(self) -> None:
        self._listing: dict[str, dict[str, int]] = {}
        self._real: dict[str, str] = {}

    def _list(self, folder: str) -> dict[str, int]:
        listing = self._listing.get(folder)
        if listing is None:
            listing = {}
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        try:
                            if e.is_symlink():
                                listing[e.name] = LINK
                            elif e.is_file(follow_symlinks=False):
                                listing[e.name] = FILE
                            else:
                                listing[e.name] = OTHER
                        except OSError:
                            listing[e.name] = OTHER
            except OSError:
                pass
            self._listing[folder] = listing
        return listing

    def kind(self, folder: str, name: str) -> int:
        return self._list(folder).get(name, ABSENT)

    def real(self, folder: str) -> str:
        real = self._real.get(folder)
        if real is None:
            real = self._real[folder] = os.path.realpath(folder)
        return real


@dataclass
class BatchCheck:
    """``check_batch``'s answer for N paths: ``files`` (absolute, normalised, as the manifest will name them),
    ``status`` (0 ok, 1 outside_root, 2 missing, 3 not a regular file) and a detail per refused row."""

    files: list[str]
    status: np.ndarray
    details: dict[int, str] = field(default_factory=dict)


OK, OUTSIDE, MISSING, NOT_FILE = 0, 1, 2, 3


def check_batch(
    root: str | os.PathLike,
    paths: Sequence[str | None],
    rules: PathRules,
    *,
    bound: bool,
    index: FolderIndex | None = None,
) -> BatchCheck:
    """Check many entries of one ``root`` at once (see the module doc for the rules; ``bound`` as in
    ``resolve_entry``), and whether each names an existing regular file (symlinks followed)."""
    index = index or FolderIndex()
    root_abs = os.path.normpath(os.path.abspath(os.fspath(root)))
    real_roots = [str(r) for r in rules.roots(root_abs)]
    bound = bound or rules.strict
    n = len(paths)
    files: list[str] = [""] * n
    status = np.zeros(n, np.int8)
    details: dict[int, str] = {}
    for i, p in enumerate(paths):
        text = "" if p is None else str(p).strip()
        if not text:
            status[i], details[i] = OUTSIDE, "empty path"
            continue
        if text[0] == "~":
            text = os.path.expanduser(text)
        absolute = text[0] == "/"
        if ".." in text.split("/"):
            # Rare: a '..' may pass through a symlinked folder; the one-by-one rules decide (resolve_entry).
            try:
                full = str(resolve_entry(root_abs, text, rules.extra_roots, bound=bound))
            except OutsideRoot as exc:
                status[i], details[i] = OUTSIDE, exc.detail
                continue
            files[i] = full
            if not os.path.isfile(full):
                status[i], details[i] = (
                    (NOT_FILE, "not a regular file")
                    if os.path.exists(full)
                    else (
                        MISSING,
                        "no such file",
                    )
                )
            continue
        full = text if absolute else f"{root_abs}/{text}"
        if _NEEDS_NORM.search(full):
            full = os.path.normpath(full)
        files[i] = full
        folder, _, name = full.rpartition("/")
        folder = folder or "/"
        kind = index.kind(folder, name)
        if kind == ABSENT:
            status[i], details[i] = MISSING, "no such file"
            continue
        if kind == OTHER:
            status[i], details[i] = NOT_FILE, "not a regular file"
            continue
        if not (bound or not absolute):
            if kind == LINK and not os.path.isfile(full):
                status[i], details[i] = MISSING, "a broken symlink"
            continue
        # The real file must lie under a root: the folder's realpath (cached), and the link's for a link.
        real = os.path.realpath(full) if kind == LINK else f"{index.real(folder).rstrip('/')}/{name}"
        if not _inside_text(real, real_roots):
            how = "a symlink" if kind == LINK or not real.startswith(folder + "/") else "the path"
            note = _extra_note([Path(r) for r in real_roots])
            status[i], details[i] = OUTSIDE, f"{how} leads to {real}, outside {real_roots[0]}{note}"
            continue
        if kind == LINK and not os.path.isfile(real):
            status[i], details[i] = (
                (NOT_FILE, "not a regular file")
                if os.path.exists(real)
                else (
                    MISSING,
                    "a broken symlink",
                )
            )
    return BatchCheck(files, status, details)


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
