"""Helpers of the reliability battery (tests/test_reliability_*.py): a corrupt clip set with its ground truth,
decoders that crash or hang on purpose, a launcher that runs ranks as one killable process tree, and process
inspection through /proc."""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from frameloom.data import sandbox
from frameloom.data.manifest import from_rows, read_manifest, write_manifest
from frameloom.data.video import ClipSpec, DecodeError
from media import truncate, write_video
from test_parallel import _entry as rank_entry  # torchrun's environment, one thread, leaves the group
from test_parallel import free_port

# ---------------------------------------------------------------- a corrupt clip set


def _boxes(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Top-level MP4 boxes: type -> (offset, size)."""
    out, i = {}, 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i : i + 4], "big")
        out[data[i + 4 : i + 8]] = (i, size)
        i += max(size, 8)
    return out


CRASH_NAME, ABORT_NAME = "crash-segv.mp4", "crash-abort.mp4"
_real_decode = sandbox.decode_clip


def write_corrupt_set(folder: Path, fps: float = 8.0) -> tuple[list[dict], dict[str, str]]:
    """Damaged and odd files beside valid ones, 8x8 pixels, 6 frames at `fps` (the battery's spec takes 4).

    Returns (manifest rows, ground truth {path: kind}) where kind is `error`, `crash` or `timeout` for the
    files that cannot give a clip. The others (a variable frame rate; a few bytes flipped inside the frame
    data, which FFmpeg conceals) decode; for those two the truth is what an in-process `decode_clip` says,
    since it depends on the encoder's bitstream. The hang is real: a FIFO that no one writes, so opening it blocks forever. The two crash files
    are valid videos on which `crashing_decoder` segfaults / aborts (installed by the test)."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = np.random.default_rng(1).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    good = write_video(folder / "base.mp4", frames, fps=fps)
    data = good.read_bytes()
    boxes = _boxes(data)
    truth: dict[str, str] = {}
    rows: list[dict] = []

    def add(name: str, num_frames: int = 6, kind: str | None = "error") -> None:
        rows.append({"path": name, "text": f"a corrupt clip {name}", "num_frames": num_frames, "height": 8,
                     "width": 8, "fps": fps})  # fmt: skip
        if kind is None:  # should decode: ask the decoder itself
            try:
                _real_decode(rows[-1], ClipSpec(num_frames=4, height=8, width=8), root=folder)
            except DecodeError:
                kind = "error"
        if kind:
            truth[name] = kind

    (folder / "zero-bytes.mp4").write_bytes(b"")
    add("zero-bytes.mp4")
    for pct in (10, 50, 90):
        truncate(good, folder / f"truncated-{pct}.mp4", pct / 100)
        add(f"truncated-{pct}.mp4")
    start, size = boxes[b"moov"]
    (folder / "moov-cut.mp4").write_bytes(data[:start] + data[start + size :])
    add("moov-cut.mp4")
    header = bytearray(data)
    for k in range(start, start + size, 7):  # bytes of the index flipped
        header[k] ^= 0xFF
    (folder / "flipped-header.mp4").write_bytes(bytes(header))
    add("flipped-header.mp4")
    payload, rng = bytearray(data), random.Random(0)
    mdat, mdat_size = boxes[b"mdat"]
    for _ in range(3):  # bytes of the frame data flipped: decodes (with damaged pixels)
        payload[rng.randrange(mdat + 8, mdat + mdat_size)] ^= 0xFF
    (folder / "flipped-payload.mp4").write_bytes(bytes(payload))
    add("flipped-payload.mp4", kind=None)
    write_video(folder / "wrong-frame-count.mp4", frames[:2], fps=fps)  # 2 frames, the manifest says 6
    add("wrong-frame-count.mp4")
    write_video(folder / "vfr.mp4", frames, fps=fps, pts=[0, 1, 3, 4, 7, 9], time_base=Fraction(1, int(fps)))
    add("vfr.mp4", kind=None)
    write_video(folder / "one-frame.mp4", frames[:1], fps=fps)
    add("one-frame.mp4", num_frames=1)
    add("missing.mp4")
    os.mkfifo(folder / "hangs.mp4")  # opening it for reading blocks until a writer comes: never
    add("hangs.mp4", kind="timeout")
    for name in (CRASH_NAME, ABORT_NAME):
        write_video(folder / name, frames, fps=fps)
        add(name, kind="crash")
    good.unlink()
    return rows, truth


def write_mixed_manifest(clean_manifest: Path, corrupt: Path, rows: list[dict], out: Path) -> Path:
    """The clean manifest's rows plus the corrupt set's (paths made absolute), as one manifest."""
    clean = read_manifest(clean_manifest).to_pylist()
    for row in clean:
        row["path"] = str((clean_manifest.parent / row["path"]).resolve())
    extra = [dict(r, path=str(corrupt / r["path"])) for r in rows]
    columns = ("path", "text", "num_frames", "height", "width", "fps")
    write_manifest(from_rows([{k: r[k] for k in columns} for r in clean + extra]), out)
    return out


def crashing_decoder(row, spec, **kw):
    """`decode_clip`, except that it segfaults on CRASH_NAME and aborts on ABORT_NAME (native crashes)."""
    name = Path(str(row["path"])).name
    if name == CRASH_NAME:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if name == ABORT_NAME:
        os.abort()
    return _real_decode(row, spec, **kw)


# ---------------------------------------------------------------- processes


def proc_stat(pid: int) -> dict[str, Any] | None:
    """state, ppid and session of a live process (None if gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return {"state": fields[0], "ppid": int(fields[1]), "session": int(fields[3])}


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat["session"] == sid and stat["state"] != "Z":
                out.append(int(entry))
    return out


def wait_gone(sid: int, timeout: float) -> tuple[float, list[int]]:
    """Seconds until session `sid` has no live process (or `timeout`), and the ones left."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        left = session_processes(sid)
        if not left:
            return time.monotonic() - start, []
        time.sleep(0.05)
    return time.monotonic() - start, session_processes(sid)


def _leader(world: int, fn: Callable, args: tuple) -> None:
    os.setsid()  # the tree is one session: killpg reaches every rank, worker and decoder
    ctx = mp.get_context("fork")
    port = free_port()
    ranks = [ctx.Process(target=rank_entry, args=(r, fn, world, port, args)) for r in range(world)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join()
    os._exit(max(abs(p.exitcode or 0) for p in ranks))


class Tree:
    """`fn(rank, *args)` in `world` rank processes under a leader process that heads a new session; forked
    from the test process, so nothing is imported again (a launch costs what building the run costs)."""

    def __init__(self, fn: Callable, args: tuple, world: int = 2):
        self.leader = mp.get_context("fork").Process(target=_leader, args=(world, fn, args))
        self.leader.start()
        self.sid = self.leader.pid
        while (stat := proc_stat(self.sid)) is not None and stat["session"] != self.sid:
            time.sleep(0.001)

    def kill(self) -> None:
        """kill -9 of the whole tree at once."""
        try:
            os.killpg(self.sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.leader.join()

    def wait(self, timeout: float) -> int:
        self.leader.join(timeout)
        if self.leader.exitcode is None:
            self.kill()
            raise TimeoutError(f"the run did not finish in {timeout} s")
        return self.leader.exitcode


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------- a recorded training run (rank function)


def train_recorded(rank: int, overrides: list[str], records: Path, widen: float = 0.0) -> None:
    """Train with `overrides` and append to records/rank{rank}.jsonl what happened: the resume point, each
    micro-batch's (step, slot, sample indices, failures) and, on rank 0, when a checkpoint starts to be
    published. `widen` > 0 sleeps inside the checkpoint write's windows (after the shards are written,
    after meta.json is written, before a folder is deleted), so a kill lands there more often."""
    import shutil

    from frameloom.checkpoint import distributed, io
    from frameloom.config import load_config
    from frameloom.train.trainer import Trainer

    log = open(records / f"rank{rank}.jsonl", "a", buffering=1)

    def event(**kw: Any) -> None:
        log.write(json.dumps(dict(kw, t=round(time.time(), 3))) + "\n")

    if widen:
        publish, fsync_tree, rmtree = distributed.publish, io._fsync_tree, shutil.rmtree

        def slow_publish(tmp, final, meta, checksums=None):
            event(publish=final.name)
            time.sleep(widen)
            return publish(tmp, final, meta, checksums)

        def slow_fsync_tree(folder):
            fsync_tree(folder)
            time.sleep(widen)  # meta.json is written, the folder not yet renamed

        def slow_rmtree(path, *args, **kw):
            time.sleep(widen)
            return rmtree(path, *args, **kw)

        distributed.publish, io._fsync_tree, shutil.rmtree = slow_publish, slow_fsync_tree, slow_rmtree

    trainer = Trainer(load_config(None, overrides))
    resume, micro_step = trainer.resume, trainer._micro_step

    def recorded_resume():
        path = resume()
        event(resumed=path.name if path else None, step=trainer.step)
        return path

    def recorded_micro_step(batch, micro, *args, **kw):
        slot = micro * trainer.data_world + trainer.data_rank
        event(
            step=trainer.step + 1,
            slot=slot,
            index=batch["index"].tolist(),
            failures=batch.get("failures", []),
        )
        return micro_step(batch, micro, *args, **kw)

    trainer.resume, trainer._micro_step = recorded_resume, recorded_micro_step
    result = trainer.fit()
    event(done=result.step)


def last_batches(records: Path, world: int = 2) -> dict[int, list[int]]:
    """step -> the step's global batch (micro-batches in slot order), from the last time it was trained."""
    by_step: dict[int, dict[int, list[int]]] = {}
    for rank in range(world):
        for rec in read_jsonl(records / f"rank{rank}.jsonl"):
            if "slot" in rec:
                by_step.setdefault(rec["step"], {})[rec["slot"]] = rec["index"]
    return {s: sum((slots[k] for k in sorted(slots)), []) for s, slots in sorted(by_step.items())}


def tagged_processes(tag: str) -> list[int]:
    """Live (not zombie) processes whose environment holds RELIABILITY_TAG=`tag`: a launched tree, including
    processes that lost their parent (their environment is inherited through fork and exec)."""
    needle = f"RELIABILITY_TAG={tag}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        stat = proc_stat(int(entry))
        if needle in environ.split(b"\0") and stat is not None and stat["state"] != "Z":
            out.append(int(entry))
    return out


def wait_untagged(tag: str, timeout: float) -> tuple[float, list[int]]:
    """Seconds until no process carries `tag` (or `timeout`), and the ones left."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not tagged_processes(tag):
            return time.monotonic() - start, []
        time.sleep(0.05)
    return time.monotonic() - start, tagged_processes(tag)
