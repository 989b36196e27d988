"""`run_dir/quarantine.jsonl`: the samples of a run that could not be decoded, with the reason.

One JSON object per line: `{"path": <manifest path>, "row": <manifest row>, "kind": "error" | "crash" |
"timeout", "reason": <text>}`. The trainer appends the failures of the batches it consumes (`record`), so
the list depends only on which samples the run trained on, never on how far the loader had read ahead: a
resumed run ends with the same list as an uninterrupted one. Each path appears once; `read_quarantine` skips
a line torn by a kill.

Loader processes read it back (`known`): a sample whose decoder crashed or hung is not decoded again in
later epochs or after a resume (it would cost a crash or a whole timeout every time); it fails at once with
the recorded reason and is substituted exactly as the first failure was (`sampler.substitute_index` is a
pure function of seed, epoch, row and attempt). Samples that failed with an ordinary decode error are simply
decoded again (cheap, and they fail the same way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FILE = "quarantine.jsonl"
SKIPPED_KINDS = ("crash", "timeout")  # never decoded again once recorded


def read_quarantine(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a quarantine file, first one per path, in file order (torn or foreign lines skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    entries, seen = [], set()
    for line in path.read_bytes().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"] not in seen:
            seen.add(entry["path"])
            entries.append(entry)
    return entries


class Quarantine:
    """A run's quarantine file, read incrementally (each process keeps its own copy in memory)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0  # bytes of the file already read

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_entries": {}, "_offset": 0}

    def _refresh(self) -> None:
        """Read lines appended since the last look (by this or any other process)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size <= self._offset:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        complete = data.rfind(b"\n") + 1  # a line still being written is read next time
        for line in data[:complete].splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # torn by a kill
                continue
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                self._entries.setdefault(entry["path"], entry)
        self._offset += complete

    def known(self, path: str) -> dict[str, Any] | None:
        """The recorded crash/timeout entry of `path` (its decoder is not run again), or None."""
        self._refresh()
        entry = self._entries.get(path)
        return entry if entry is not None and entry.get("kind") in SKIPPED_KINDS else None

    def record(self, failures: Iterable[dict[str, Any]]) -> int:
        """Append the failures whose path is not listed yet (one write); returns how many were added."""
        self._refresh()
        lines = []
        for failure in failures:
            entry = {k: failure[k] for k in ("path", "row", "kind", "reason")}
            if entry["path"] not in self._entries:
                self._entries[entry["path"]] = entry
                lines.append(json.dumps(entry) + "\n")
        if lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                torn = os.fstat(fd).st_size > 0 and not self._ends_with_newline()
                text = ("\n" if torn else "") + "".join(lines)  # a line torn by a kill stays on its own
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        return len(lines)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
