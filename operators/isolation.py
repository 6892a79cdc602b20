"""Decoding in a child process: a decoder that crashes or hangs takes only its child down.

FFmpeg parses whatever bytes an archive holds, and a hostile or damaged file can make a
decoder abort (decord 0.6 throws ``std::bad_alloc`` and dies with SIGABRT on an MP4 whose
header claims billions of frames), spin, or block on a read that never returns. So decoding
runs in a small child process (numpy and PyAV only) that the parent talks to over a socket:

- ``("probe", target, size)`` -> ``("ok", info)`` or ``("error", message)``;
- ``("decode", target, indices, options)`` -> ``("shape", h, w)``; the parent answers
  ``("ring", slots, slot_bytes)`` and the ring's file descriptor; then ``("frame", index, timestamp_s, slot)`` per
  frame and finally ``("end", error_or_None)``.

Frames travel through a ring of ``slots`` frame-sized slots in a shared-memory file (one copy
in, one copy out, no pickling); the parent hands a slot back with ``("free", slot)``, so the
child decodes at most ``slots`` frames ahead of the model and memory stays bounded.

The parent watches for *progress*: a message, or bytes read by the child (``/proc/<pid>/io``
on Linux, which counts reads from local files and from the range proxy alike). A child that
makes no progress for ``timeout_s`` is killed as hung; one that dies is reported with its
signal and the last line it wrote to stderr. The caller (``operators.decode``) restarts a
fresh child from the first frame not yet delivered, a bounded number of times.

The child gets no credentials: it reads local paths or the loopback proxy, never the object
store, so secrets are stripped from its environment. It exits when its parent does.
"""

from __future__ import annotations

import atexit
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

#: Frames the child may decode ahead of the parent (slots of the shared-memory ring).
RING_SLOTS = 4
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "ACCESS_KEY", "PRIVATE")
_LOG_LIMIT_BYTES = 1 << 20


class DecoderFailed(Exception):
    """The child crashed or hung; ``str()`` says how (``crashed (SIGSEGV)``, ...)."""


class DecoderCrashed(DecoderFailed):
    pass


class DecoderHung(DecoderFailed):
    pass


def child_env() -> dict[str, str]:
    """The child's environment: the parent's, minus anything that looks like a credential,
    with the package importable."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("AWS_") or any(w in k.upper() for w in _SECRET_WORDS))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class DecoderProcess:
    """One decoder child process (see the module docstring)."""

    def __init__(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        # The child's stderr: a file without a name (nothing is left behind, whatever kills
        # whom), read by the parent with pread when the child dies.
        self._log_fd, path = tempfile.mkstemp(prefix="vidprune-decoder-", suffix=".log")
        os.unlink(path)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from operators.isolation import child_main; "
                 "child_main()", str(child_sock.fileno()), str(os.getpid())],
                pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._log_fd, env=child_env(),
                close_fds=True)
        except BaseException:
            parent_sock.close()
            os.close(self._log_fd)
            raise
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self._io_path = f"/proc/{self.proc.pid}/io"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.conn.closed

    def send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:
            raise DecoderCrashed(self.describe_exit()) from None

    def send_handle(self, fd: int) -> None:
        """Pass an open file to the child (it receives a copy of the descriptor)."""
        from multiprocessing.reduction import send_handle

        try:
            send_handle(self.conn, fd, self.proc.pid)
        except OSError:
            raise DecoderCrashed(self.describe_exit()) from None

    def receive(self, timeout_s: float) -> tuple:
        """The child's next message. Raises :class:`DecoderCrashed` if it dies and
        :class:`DecoderHung` if it neither sends anything nor reads any input for
        ``timeout_s``."""
        last_io = self._io()
        last = time.monotonic()
        step = max(0.01, min(1.0, timeout_s / 4))
        while True:
            try:
                if self.conn.poll(step):
                    return self.conn.recv()
            except (EOFError, OSError):
                raise DecoderCrashed(self.describe_exit()) from None
            if self.proc.poll() is not None:
                raise DecoderCrashed(self.describe_exit())
            now = time.monotonic()
            io = self._io()
            if io != last_io:
                last_io, last = io, now
            elif now - last >= timeout_s:
                raise DecoderHung(f"made no progress for {timeout_s:g} s (no frame, no input "
                                  "read) and was stopped")

    def _io(self) -> int | None:
        """Bytes the child has read so far (Linux); None where unknown."""
        try:
            with open(self._io_path) as f:
                for line in f:
                    if line.startswith("rchar:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def describe_exit(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            what = f"crashed ({name}"
            if -code == signal.SIGKILL:
                what += ", killed: out of memory?"
            last = self.last_log_line()
            return what + (f": {last})" if last else ")")
        last = self.last_log_line()
        return f"exited with code {code}" + (f" ({last})" if last else "")

    def last_log_line(self) -> str | None:
        """What the child last wrote to stderr before it died (``terminate called after
        throwing an instance of 'std::bad_alloc'``, say), without Python's fault report."""
        try:
            size = os.fstat(self._log_fd).st_size
            text = os.pread(self._log_fd, 8192, max(0, size - 8192)).decode("utf-8", "replace")
        except OSError:
            return None
        text = text.split("Fatal Python error", 1)[0]
        lines = [" ".join(line.split()) for line in text.splitlines()]
        lines = [line for line in lines if line and not line.startswith("[")]
        return "; ".join(lines[-2:])[:200] or None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.close()

    def close(self) -> None:
        if not self.conn.closed:
            if self.proc.poll() is None:
                try:
                    self.conn.send(("exit",))
                except OSError:
                    pass
            self.conn.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1


class DecoderPool:
    """Idle children kept for reuse (starting one costs a Python interpreter with numpy and
    PyAV, about 0.2 s)."""

    def __init__(self, max_idle: int = 8) -> None:
        self.max_idle = max_idle
        self._idle: list[DecoderProcess] = []
        self._lock = threading.Lock()

    def take(self) -> DecoderProcess:
        with self._lock:
            while self._idle:
                proc = self._idle.pop()
                if proc.alive():
                    return proc
                proc.close()
        return DecoderProcess()

    def give(self, proc: DecoderProcess) -> None:
        """Return a child that finished its request cleanly."""
        with self._lock:
            if proc.alive() and len(self._idle) < self.max_idle:
                self._idle.append(proc)
                return
        proc.close()

    def pids(self) -> list[int]:
        """The idle children (for diagnostics and benchmarks)."""
        with self._lock:
            return [proc.pid for proc in self._idle if proc.alive()]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for proc in idle:
            proc.kill()


_POOL: DecoderPool | None = None
_POOL_LOCK = threading.Lock()


def shared_pool() -> DecoderPool:
    """The process's pool of decoder children, started on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = DecoderPool()
            atexit.register(_POOL.close)
        return _POOL


class FrameRing:
    """``slots`` frame-sized slots in a shared-memory file without a name: the parent
    creates it, removes its name at once and passes the open file to the child over their
    socket (``SCM_RIGHTS``), so nothing is left behind whatever kills whom. Its space is
    reserved up front (a full tmpfs would otherwise kill the process that touches the page
    with SIGBUS): in ``/dev/shm`` where it fits, else in the temporary folder (page cache, the
    same speed while memory lasts)."""

    def __init__(self, fd: int, slots: int, slot_bytes: int):
        self.slots, self.slot_bytes = slots, slot_bytes
        self.mm = mmap.mmap(fd, slots * slot_bytes)

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> tuple["FrameRing", int]:
        """A new ring and its open file (to send to the child, then close)."""
        folders = [tempfile.gettempdir()]
        if os.access("/dev/shm", os.W_OK):
            folders.insert(0, "/dev/shm")
        for i, folder in enumerate(folders):
            path = os.path.join(folder, f"vidprune-frames-{os.getpid()}-{os.urandom(6).hex()}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(path)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, slots * slot_bytes)
                else:  # pragma: no cover - macOS: sparse, as good as it gets there
                    os.ftruncate(fd, slots * slot_bytes)
                return cls(fd, slots, slot_bytes), fd
            except OSError:
                os.close(fd)
                if i == len(folders) - 1:
                    raise
        raise AssertionError("unreachable")

    def put(self, slot: int, data: Any) -> None:
        import numpy as np

        view = np.frombuffer(self.mm, np.uint8, count=data.nbytes,
                             offset=slot * self.slot_bytes).reshape(data.shape)
        np.copyto(view, data)
        del view

    def take(self, slot: int, shape: tuple[int, ...]):
        """A copy of the frame in ``slot`` (the slot is reused as soon as it is freed)."""
        import numpy as np

        n = int(np.prod(shape))
        view = np.frombuffer(self.mm, np.uint8, count=n, offset=slot * self.slot_bytes)
        out = view.reshape(shape).copy()
        del view
        return out

    def close(self) -> None:
        self.mm.close()


# -- the child --------------------------------------------------------------------------------

def _trim_stderr() -> None:
    """The child's stderr is a file (what a crashing child last wrote is read from it);
    empty it when it grows large."""
    if os.fstat(2).st_size > _LOG_LIMIT_BYTES:
        os.ftruncate(2, 0)
        os.lseek(2, 0, os.SEEK_SET)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone, even while FFmpeg is blocked or spinning."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def child_main(argv: list[str] | None = None) -> None:
    """Entry point of the child process (argv: socket fd, parent pid)."""
    argv = sys.argv[1:] if argv is None else argv
    fd, parent_pid = int(argv[0]), int(argv[1])
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    import faulthandler

    faulthandler.enable()  # a fatal signal leaves a trace in the stderr file
    conn = Connection(fd)
    import av.logging

    from . import decode

    # FFmpeg's reasons (``moov atom not found``) travel inside PyAV's exceptions.
    av.logging.set_level(av.logging.ERROR)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "exit":
            return
        if kind == "probe":
            _trim_stderr()
            try:
                conn.send(("ok", decode.probe_target(msg[1], msg[2] if len(msg) > 2 else None)))
            except Exception as exc:
                conn.send(("error", decode.exc_message(exc)))
        elif kind == "decode":
            _trim_stderr()
            _serve_segment(conn, msg[1], msg[2])
        # anything else ("free" or "stop" for a segment already over) is ignored


def _serve_segment(conn: Connection, target: str, indices: list[int]) -> None:
    from .decode import AVSegment

    seg = AVSegment(target, indices)
    ring = None
    try:
        frame = seg.read()
        if frame is None:
            conn.send(("end", seg.error))
            return
        shape = frame.rgb.shape
        conn.send(("shape", shape[0], shape[1]))
        reply = conn.recv()
        if reply[0] != "ring":
            return
        from multiprocessing.reduction import recv_handle

        fd = recv_handle(conn)
        try:
            ring = FrameRing(fd, reply[1], reply[2])
        finally:
            os.close(fd)
        free = deque(range(ring.slots))
        while frame is not None:
            while not free or conn.poll(0):
                reply = conn.recv()
                if reply[0] != "free":
                    return  # the parent gave up on this segment
                free.append(reply[1])
            if frame.rgb.shape != shape:
                seg.error = (f"decoding failed at frame {frame.index}: the frame size changed "
                             f"from {shape[1]}x{shape[0]} to {frame.rgb.shape[1]}x"
                             f"{frame.rgb.shape[0]} in mid-stream")
                break
            slot = free.popleft()
            ring.put(slot, frame.rgb)
            conn.send(("frame", frame.index, frame.timestamp_s, slot))
            frame = seg.read()
        conn.send(("end", seg.error))
    finally:
        seg.close()
        if ring is not None:
            ring.mm.close()
