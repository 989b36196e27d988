"""Path safety for dataset files: every listed path must stay inside the root it is given relative to.

A dataset file names its media by path; such a file may come from anywhere (a download, a colleague), and
an entry like ``../../home/me/.ssh/id_rsa``, ``/etc/passwd`` or a symlink that points out of the data folder
would otherwise make frameloom read (and, through the cache, encode and keep) a file the user never meant
to hand over. So each entry is resolved against its root, symlinks followed, and kept only when the real
file lies under the root or under one of the extra roots the user allowed (``--allow-root DIR``,
``data.extra_roots``). Anything else is rejected with reason ``outside_root``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

OUTSIDE_ROOT = "outside_root"
"""The reject reason for an entry whose file lies outside every allowed root."""


class OutsideRoot(Exception):
    """An entry that escapes its root; ``detail`` says where it leads."""

    def __init__(self, entry: str, detail: str):
        super().__init__(f"{entry}: {detail}")
        self.entry = entry
        self.detail = detail


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def allowed_roots(root: str | os.PathLike, extra_roots: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The real (symlink-free, absolute) folders an entry may resolve into: ``root`` and the extras."""
    return [Path(root).resolve()] + [Path(r).expanduser().resolve() for r in extra_roots]


def resolve_entry(root: str | os.PathLike, entry: str, extra_roots: Iterable[str | os.PathLike] = ()) -> Path:
    """The absolute path of ``entry`` (relative to ``root``, or absolute), checked to stay inside.

    Returns the lexically normalised path (``a/./b/../c.mp4`` -> ``ROOT/a/c.mp4``; symlinked names are kept,
    so a folder of links stays a folder of links in the manifest). The check itself uses the real path,
    with every symlink followed: the file that would actually be opened must lie under ``root`` or an
    extra root. A path whose ``..`` passes through a symlink is returned resolved, since its lexical form
    would name another file. Raises ``OutsideRoot`` otherwise; a missing file is not this function's
    concern (the probe reports it).
    """
    text = str(entry).strip()
    if not text:
        raise OutsideRoot(entry, "empty path")
    given = Path(text).expanduser()
    candidate = given if given.is_absolute() else Path(root) / given
    lexical = Path(os.path.normpath(os.path.abspath(candidate)))
    real = candidate.resolve()
    roots = allowed_roots(root, extra_roots)
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


__all__ = ["OUTSIDE_ROOT", "OutsideRoot", "allowed_roots", "resolve_entry"]
