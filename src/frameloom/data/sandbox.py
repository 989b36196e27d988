"""Sandboxed decoding: one sample's native crash or hang costs only that sample.

FFmpeg is C: a damaged file among millions of scraped clips can segfault or abort the process decoding it, or
make it spin forever. Each loader process (the trainer's main process with `data.num_workers: 0`, else each
DataLoader worker) therefore decodes in a child of its own, forked on first use and kept for every later
sample, so a healthy run pays one fork per loader process plus a pipe copy of each decoded clip
(benchmarks/decode_sandbox.py measures it).

Protocol, over two pipes: the parent writes one pickled request (row, spec, root, output, draw), the child
answers with a length-prefixed JSON header. On success the clip's raw bytes go through a memory file the two
share (Linux memfd, grown as needed: one copy on each side, no pipe round trips) or, where there is none,
after the header through the pipe; the parent copies them into a preallocated tensor. The parent never
unpickles anything the child sends.

- The child dies (a signal, or an exit): the sample raises `DecodeCrash` (kind `crash`, reason naming the
  signal) and the next sample forks a new child.
- No answer within `timeout` seconds (`data.decode_timeout`): the child is killed, the sample raises
  `DecodeCrash` (kind `timeout`).
- Any exception in the child (a `DecodeError`, or anything else a mutated file provokes) is answered as a
  `DecodeError` with its reason.

The child ignores SIGTERM/SIGINT (preemption is the trainer's business, as for loader workers) and is killed
by the kernel when its parent dies (`die_with_parent`); it also exits when its request pipe closes.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import mmap
import os
import pickle
import select
import signal
import struct
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from frameloom.data.video import ClipSpec, DecodeError, decode_clip
from frameloom.parallel.env import die_with_parent

_LEN = struct.Struct("<Q")
_F_SETPIPE_SZ = 1031  # Linux fcntl: a 1 MiB pipe moves a clip in fewer wake-ups
_PIPE_BYTES = 1 << 20
_DTYPES = {"torch.float32": torch.float32, "torch.uint8": torch.uint8}


class DecodeCrash(DecodeError):
    """The decoder process crashed or hung on a sample (`kind`: `crash` or `timeout`)."""

    def __init__(self, path: str, reason: str, kind: str):
        super().__init__(path, reason)
        self.kind = kind


def _resolve(row: dict[str, Any], root: str | os.PathLike | None) -> str:
    raw = Path(str(row["path"]))
    return str(raw if raw.is_absolute() or root is None else Path(root) / raw)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---------------------------------------------------------------- pipe I/O (both sides)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytearray | None:
    """`n` bytes from `fd`; None at end of file; TimeoutError past `deadline` (monotonic seconds)."""
    out = bytearray(n)
    return out if _read_into(fd, memoryview(out), deadline) else None


def _read_into(fd: int, view: memoryview, deadline: float | None) -> bool:
    """Fill `view` from `fd`; False at end of file; TimeoutError past `deadline`."""
    view = view.cast("B")
    poller = select.poll() if deadline is not None else None
    if poller is not None:
        poller.register(fd, select.POLLIN)
    while view:
        if poller is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError
        chunk = os.read(fd, min(len(view), _PIPE_BYTES))
        if not chunk:
            return False
        view[: len(chunk)] = chunk
        view = view[len(chunk) :]
    return True


class _SharedMemory:
    """A growable memory file (memfd) the parent and its child both map: the child writes a clip into it, the
    parent copies it out; one request at a time, so one buffer suffices."""

    def __init__(self, fd: int):
        self.fd = fd
        self._map: mmap.mmap | None = None

    def _mapped(self, n: int, grow: bool) -> mmap.mmap:
        if grow and os.fstat(self.fd).st_size < n:
            os.ftruncate(self.fd, n)
        if self._map is None or len(self._map) < n:
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        return self._map

    def write(self, data: memoryview) -> None:
        """Child: the clip's bytes into the file (grown to fit)."""
        with memoryview(self._mapped(len(data), grow=True)) as view:
            view[: len(data)] = data

    def read_into(self, out: memoryview) -> None:
        """Parent: the first len(out) bytes of the file."""
        with memoryview(self._mapped(len(out), grow=False)) as view:
            out[:] = view[: len(out)]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        os.close(self.fd)


def _new_shared_memory() -> _SharedMemory | None:
    try:
        return _SharedMemory(os.memfd_create("frameloom-decode"))
    except (AttributeError, OSError):  # no memfd (not Linux): clips go through the pipe
        return None


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, OSError):
        pass


# ---------------------------------------------------------------- the child


def _serve(requests: int, replies: int, parent: int, shared: _SharedMemory | None) -> None:
    """The child's loop: decode requests until the request pipe closes. Never returns into the parent's code
    (the caller `os._exit`s)."""
    die_with_parent(parent)
    # A crash is the parent's to report, as one line: no inherited stack dump (faulthandler) and no
    # DataLoader worker handler ("Unexpected segmentation fault encountered in worker").
    faulthandler.disable()
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # one sample at a time; no OpenMP pool inherited across fork
    while True:
        head = _read_exact(requests, _LEN.size, None)
        if head is None:
            return
        body = _read_exact(requests, _LEN.unpack(head)[0], None)
        if body is None:
            return
        row, spec, root, output, draw = pickle.loads(body)  # from our own parent
        payload: memoryview | None = None
        try:
            video = decode_clip(row, spec, root=root, output=output, draw=draw).contiguous()
            header = {
                "ok": True,
                "shape": list(video.shape),
                "dtype": str(video.dtype),
                "shared": shared is not None,
            }
            payload = memoryview(video.numpy()).cast("B")
            if shared is not None:
                shared.write(payload)
                payload = None
        except DecodeError as exc:
            header = {"ok": False, "path": exc.path, "reason": exc.reason}
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file provokes is that sample's failure
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            header = {"ok": False, "path": _resolve(row, root), "reason": reason.rstrip(": ")}
        encoded = json.dumps(header).encode()
        _write_all(replies, _LEN.pack(len(encoded)) + encoded)
        if payload is not None:
            _write_all(replies, payload)


# ---------------------------------------------------------------- the parent


class DecodeSandbox:
    """`decode_clip` in a persistent child process, with a per-sample `timeout` in seconds (see the module
    docstring). One child per process that uses it (a forked or unpickled copy starts its own); `close()`
    ends it (also at exit)."""

    def __init__(self, timeout: float):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = float(timeout)
        self.started = 0  # children forked by this process (1 + restarts after crashes and hangs)
        self._owner = None  # pid that forked the current child
        self._pid = self._requests = self._replies = self._shared = None

    def __getstate__(self) -> dict[str, Any]:  # a copy sent to a spawned worker starts its own child
        return {"timeout": self.timeout, "started": 0, "_owner": None, "_pid": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _requests=None, _replies=None, _shared=None)

    # -- child lifecycle

    def _alive(self) -> bool:
        return self._pid is not None and self._owner == os.getpid()

    def _start(self) -> None:
        if not hasattr(os, "fork"):
            raise RuntimeError("decoding in a sandbox needs os.fork (set data.decode_timeout=0)")
        parent = os.getpid()
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        _grow_pipe(rep_w)
        shared = _new_shared_memory()
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():  # Python >= 3.12 warns about forking a process with threads: the
            warnings.simplefilter("ignore", DeprecationWarning)  # child only decodes (see _serve)
            pid = os.fork()
        if pid == 0:  # the child: serve, then leave without running any of the parent's exit handlers
            code = 0
            try:
                os.close(req_w)
                os.close(rep_r)
                _serve(req_r, rep_w, parent, shared)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        if self._owner != parent:  # first child of this process: end it at exit
            atexit.register(self.close)
        self._pid, self._owner, self._requests, self._replies, self._shared = (
            pid,
            parent,
            req_w,
            rep_r,
            shared,
        )
        self.started += 1

    def _reap(self, kill: bool, grace: float = 0.0) -> str:
        """Close the pipes, wait up to `grace` seconds for the child to exit (it does once its request pipe
        closes), then (if `kill`) kill it and wait; returns how it ended."""
        pid = self._pid
        for fd in (self._requests, self._replies):
            if fd is not None:
                os.close(fd)
        if self._shared is not None:
            self._shared.close()
        self._pid = self._requests = self._replies = self._shared = None
        deadline = time.monotonic() + grace
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done or time.monotonic() >= deadline:
                    break
                time.sleep(0.005)
            if not done:
                if kill:
                    os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler): the cause is unknown
            return "exited"
        if os.WIFSIGNALED(status):
            return _signal_name(os.WTERMSIG(status))
        return f"exit status {os.WEXITSTATUS(status)}"

    def close(self) -> None:
        """End this process's child: it exits when its request pipe closes (killed after 5 s otherwise)."""
        if self._alive():
            self._reap(kill=True, grace=5.0)

    # -- one sample

    def decode(
        self,
        row: dict[str, Any],
        spec: ClipSpec,
        *,
        root: str | os.PathLike | None = None,
        output: str = "uint8",
        draw: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """`decode_clip(row, spec, ...)` in the child. Raises `DecodeError` (the file cannot be decoded) or
        `DecodeCrash` (the decoder crashed or exceeded the timeout)."""
        if not self._alive():
            self._start()
        request = pickle.dumps((row, spec, str(root) if root is not None else None, output, draw))
        deadline = time.monotonic() + self.timeout
        try:
            _write_all(self._requests, _LEN.pack(len(request)) + request)
            head = _read_exact(self._replies, _LEN.size, deadline)
            header = None if head is None else _read_exact(self._replies, _LEN.unpack(head)[0], deadline)
            if header is None:
                raise BrokenPipeError
            header = json.loads(header)
            if not header["ok"]:
                raise DecodeError(header["path"], header["reason"])
            video = torch.empty(header["shape"], dtype=_DTYPES[header["dtype"]])
            out = memoryview(video.numpy()).cast("B")
            if header.get("shared"):
                self._shared.read_into(out)
            elif not _read_into(self._replies, out, deadline):
                raise BrokenPipeError
            return video
        except TimeoutError:
            self._reap(kill=True)
            reason = f"no result within {self.timeout:g} s (decoder hung)"
            raise DecodeCrash(_resolve(row, root), reason, "timeout") from None
        except (BrokenPipeError, ConnectionResetError):
            how = self._reap(kill=True, grace=2.0)  # it is exiting: let it, so its signal is the reason
            raise DecodeCrash(_resolve(row, root), f"decoder crashed ({how})", "crash") from None
