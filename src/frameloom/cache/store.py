"""The on-disk store of cached tensors: one safetensors file per entry, written atomically.

Layout: ``root/<kind>/<key[:2]>/<key>.safetensors`` (``kind`` is ``"video"`` or ``"text"``). The two-character
fan-out keeps folders at a size every filesystem lists quickly, even for millions of entries.

Atomicity: ``put`` writes ``.<key>.<host>.<pid>.<random>.tmp`` in the entry's own folder (same filesystem)
and renames it over the final name with ``os.replace``, which is atomic on POSIX and Windows. A reader
therefore sees either no entry or a complete one; a process killed mid-write leaves only a temp file, which
no reader ever opens and ``cleanup_temp`` removes. Several processes (ranks) may write the same entry at once:
the last rename wins and both files hold the same content.

Damage that happens anyway (a disk filling up, a copy interrupted by hand) is caught on read: an entry that
safetensors cannot parse, or whose data does not cover its header's extent, is treated as missing, so the
cache builder encodes it again.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save

__all__ = ["CacheStore", "KINDS"]

KINDS = ("video", "text")
_KEY_RE = re.compile(r"[0-9a-f]{16,128}")
_SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"


def _host() -> str:
    # Temp names are split on "."; a host name's dots would make that ambiguous.
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or we cannot tell: keep its file
    return True


class CacheStore:
    """A content-keyed store of tensor dicts under ``root`` (see the module docstring).

    ``fsync=True`` flushes every entry to the device before renaming it, for filesystems where a power loss
    could otherwise leave a renamed but empty file (such a file is detected as damaged and re-encoded anyway,
    so it is off by default: it costs a disk round-trip per entry).
    """

    def __init__(self, root: str | os.PathLike, *, fsync: bool = False):
        self.root = Path(root)
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------------------------

    def path(self, kind: str, key: str) -> Path:
        """The final file of an entry (whether or not it exists)."""
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not _KEY_RE.fullmatch(key):
            # Keys are hex digests; anything else could escape the store's folder.
            raise ValueError(f"invalid cache key {key!r}: expected a lowercase hex digest")
        return self.root / kind / key[:2] / f"{key}{_SUFFIX}"

    # -- write ---------------------------------------------------------------------------------------------

    def put(
        self,
        kind: str,
        key: str,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str] | None = None,
    ) -> Path:
        """Write an entry atomically (temp file in the same folder, then ``os.replace``); returns its path."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Clone: safetensors refuses tensors that share storage, and views of a batch tensor would otherwise
        # serialize fine only by accident of layout.
        data = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        payload = save(data, metadata=meta or None)
        tmp = final.parent / f".{key}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
        try:
            with open(tmp, "xb") as f:
                f.write(payload)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            # Leave no temp file behind on an error we see (a kill we cannot see is what cleanup_temp is for).
            tmp.unlink(missing_ok=True)
            raise
        return final

    # -- read ----------------------------------------------------------------------------------------------

    def has(self, kind: str, key: str) -> bool:
        """Whether a complete, readable entry exists.

        Opens the header only (safetensors checks the data covers every tensor's extent), so a truncated file
        counts as missing without reading its tensors.
        """
        path = self.path(kind, key)
        try:
            with safe_open(str(path), framework="pt"):
                return True
        except Exception:  # FileNotFoundError, SafetensorError (bad/short header, short data), ...
            return False

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None if it is absent or unreadable."""
        path = self.path(kind, key)
        try:
            return load(path.read_bytes())
        except Exception:  # missing, truncated or otherwise damaged: the caller re-encodes
            return None

    def metadata(self, kind: str, key: str) -> dict[str, str] | None:
        """The entry's metadata dict (empty if none was stored), or None if it is absent or unreadable."""
        try:
            with safe_open(str(self.path(kind, key)), framework="pt") as f:
                return dict(f.metadata() or {})
        except Exception:
            return None

    # -- maintenance ---------------------------------------------------------------------------------------

    def _temp_files(self) -> Iterator[Path]:
        for kind in KINDS:
            base = self.root / kind
            if not base.is_dir():
                continue
            for sub in base.iterdir():
                if sub.is_dir():
                    yield from sub.glob(f".*{_TMP_SUFFIX}")

    def cleanup_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove temp files left by killed writers; returns how many were removed.

        A temp file is removed when it is older than ``older_than_s`` seconds, or when it was written on this
        host by a process that no longer exists. Recent files of live processes (other ranks writing right
        now, perhaps on other hosts) are kept, so this is safe to call while other writers run.
        """
        host, now, removed = _host(), time.time(), 0
        for tmp in self._temp_files():
            parts = tmp.name[1:].split(".")  # key, host, pid, random, "tmp"
            try:
                age = now - tmp.stat().st_mtime
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
            dead_here = (
                len(parts) == 5
                and parts[1] == host
                and parts[2].isdigit()
                and int(parts[2]) != os.getpid()
                and not _pid_alive(int(parts[2]))
            )
            if age > older_than_s or dead_here:
                try:
                    tmp.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def keys(self, kind: str) -> Iterator[str]:
        """Every complete-looking entry's key of a kind (temp files excluded; files are not opened)."""
        base = self.root / kind
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.glob(f"*{_SUFFIX}")):
                    if not f.name.startswith("."):
                        yield f.name[: -len(_SUFFIX)]
