"""Checksums of a checkpoint's files, and checking a step folder against them.

Every file of a step folder (whatever the checkpoint holds: full weights, an adapter, `dcp/` shards) is
listed in `meta.json` under `checksums` as `{relative path: {"bytes": size, "sha256": hex}}`, computed from
the files on disk after they were written, before `meta.json` (written last) completes the folder.
`verify_checkpoint` recomputes them: a truncated shard, flipped bits, a missing or an extra file, a missing or
unreadable meta.json are each reported by file name. Checkpoints written before checksums existed verify as
`legacy` (their listed files must exist; their contents cannot be checked).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

META = "meta.json"
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def checkpoint_files(folder: str | Path) -> list[str]:
    """Every entry under `folder` except meta.json, as sorted POSIX paths relative to it (regular files;
    anything else is listed too, so that it fails verification instead of being skipped)."""
    folder = Path(folder)
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if not p.is_dir() and p.relative_to(folder).as_posix() != META
    )


def file_checksums(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """`{name: {"bytes", "sha256"}}` of `names` (default: `checkpoint_files(folder)`)."""
    folder = Path(folder)
    names = checkpoint_files(folder) if names is None else names
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in names}


@dataclass
class VerifyResult:
    """What `verify_checkpoint` found in one step folder."""

    path: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    legacy: bool = False  # no checksums in meta.json (an older frameloom): contents not checked

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.problems:
            return f"{self.path.name}  DAMAGED  " + "; ".join(self.problems)
        note = "  (no checksums: written by an older frameloom; files present)" if self.legacy else ""
        return f"{self.path.name}  ok  {self.files} file(s), {self.bytes / 2**20:.1f} MiB{note}"


def read_meta_json(folder: str | Path) -> dict[str, Any]:
    """meta.json as a dict; raises ValueError/OSError when it is missing or not a JSON object with a step."""
    meta = json.loads((Path(folder) / META).read_text())
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not a JSON object")
    int(meta["step"])
    return meta


def verify_checkpoint(folder: str | Path) -> VerifyResult:
    """Check a step folder against the checksums in its meta.json; every problem names its file."""
    folder = Path(folder)
    result = VerifyResult(folder)
    if not (folder / META).is_file():
        result.problems.append(f"{META}: missing (incomplete checkpoint)")
        return result
    try:
        meta = read_meta_json(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        result.problems.append(f"{META}: unreadable ({type(exc).__name__})")
        return result
    expected = meta.get("checksums")
    present = checkpoint_files(folder)
    if not isinstance(expected, dict):
        result.legacy = True
        for name in meta.get("files", []):
            if not (folder / name).exists():
                result.problems.append(f"{name}: missing")
        result.files = len(present)
        result.bytes = sum((folder / n).stat().st_size for n in present if (folder / n).is_file())
        return result
    for name in present:
        if name not in expected:
            result.problems.append(f"{name}: not listed in {META}")
    for name, want in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            result.problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != want.get("bytes"):
            result.problems.append(f"{name}: {size} bytes, expected {want.get('bytes')}")
        elif file_sha256(path) != want.get("sha256"):
            result.problems.append(f"{name}: checksum mismatch")
        result.files += 1
        result.bytes += size
    return result


def verify_run(run_dir: str | Path) -> list[VerifyResult]:
    """`frameloom verify`: every `step-*` folder of a run, oldest first (complete or not)."""
    from frameloom.errors import FrameloomError

    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise FrameloomError(f"run directory not found: {run_dir}")
    if not root.is_dir():
        raise FrameloomError(f"{run_dir} has no checkpoints/ folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    if not folders:
        raise FrameloomError(f"no checkpoint in {root}")
    return [verify_checkpoint(p) for p in folders]
