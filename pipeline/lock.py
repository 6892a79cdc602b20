"""One job at a time per output location.

Two jobs writing one output would interleave their files (one's ``overwrite`` deleting what
the other writes, two ``job.json`` and ``videos/`` racing). So a job holds the output's lock
from its first write to its end, and a second job is refused with the holder's name.

The lock is a folder ``_lock/`` of generation files ``<generation>.json`` (job id, host, pid,
start and heartbeat times, a random token). The holder is the job that wrote the highest
generation; it rewrites its file every ``heartbeat_s``. Taking the lock means *creating*
the next generation's file, which succeeds for exactly one job when the store can create a
file only if it is absent:

- local folders (and NFS): a hard link to a fully written temporary file (``link`` fails if
  the name exists), so a lock file is never seen half-written;
- S3: ``PutObject`` with ``If-None-Match: *`` (AWS S3 since August 2024, MinIO, moto). A store
  that ignores the condition is detected (a second conditional write of the same name
  succeeds); there vidprune warns, waits ``settle_s`` and reads the file back, which catches
  all but near-simultaneous starts: the lock is best effort on such stores. A missing
  bucket or denied access is no such store: it raises (``FileNotFoundError``,
  ``PermissionError``), and the job is refused.

A lock is *stale*, and the next job takes it over by creating the next generation, when its
heartbeat is older than ``stale_after_s`` (clocks of the hosts must agree to well within that),
or at once when its holder ran on this host and its process is gone. A holder that finds a
newer generation, or its own file gone or rewritten, has lost the lock: the job stops
without writing its final files. Lower generations are removed by the next holder.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from .storage import Location, is_local

LOCK_DIR = "_lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
SETTLE_S = 2.0


class OutputLocked(Exception):
    """Another job holds the output's lock."""


class LockLost(Exception):
    """This job's lock was taken over (or could not be refreshed): it must stop writing."""


@dataclass
class LockInfo:
    job_id: str
    host: str
    pid: int
    token: str
    started_at: float   # seconds since the epoch, the holder's clock
    heartbeat_at: float

    def describe(self, now: float) -> str:
        started = datetime.fromtimestamp(self.started_at, timezone.utc)
        return (f"job {self.job_id} (host {self.host}, pid {self.pid}), started "
                f"{started:%Y-%m-%d %H:%M:%S} UTC, last heartbeat "
                f"{max(0.0, now - self.heartbeat_at):.0f} s ago")


def _generation_name(generation: int) -> str:
    return f"{generation:012d}.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class OutputLock:
    """The lock of ``location`` for the job ``job_id`` (see the module docstring)."""

    def __init__(self, location: Location, job_id: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, settle_s: float = SETTLE_S,
                 log: Callable[[str], None] | None = None):
        self.location = location
        self.job_id = job_id
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.settle_s = settle_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.generation: int | None = None
        self.info: LockInfo | None = None
        self.took_over: LockInfo | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ------------------------------------------------------------------------------
    def _generations(self) -> list[int]:
        out = []
        for name in self.location.files(LOCK_DIR):
            stem = name[:-len(".json")] if name.endswith(".json") else ""
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def _read(self, generation: int) -> LockInfo | None:
        try:
            data = json.loads(self.location.read_bytes(
                posixpath.join(LOCK_DIR, _generation_name(generation))))
            return LockInfo(**{k: data[k] for k in LockInfo.__dataclass_fields__})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # Unreadable or foreign content: held, and as fresh as the file itself.
            modified = self._modified(generation)
            if modified is None:
                return None
            return LockInfo("unknown", "unknown", -1, "", modified, modified)

    def _modified(self, generation: int) -> float | None:
        try:
            info = self.location.fs.info(self._path(generation))
        except OSError:
            return None
        stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
        if hasattr(stamp, "timestamp"):
            stamp = stamp.timestamp()
        try:
            return float(stamp)
        except (TypeError, ValueError):
            return time.time()

    def holder(self) -> tuple[int, LockInfo] | None:
        """The current holder (generation, info), stale or not; None when unlocked."""
        for generation in reversed(self._generations()):
            info = self._read(generation)
            if info is not None:
                return generation, info
        return None

    def stale(self, info: LockInfo, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if info.host == socket.gethostname() and info.pid > 0 and info.pid != os.getpid() \
                and not _pid_alive(info.pid):
            return True  # its process on this host is gone
        return now - info.heartbeat_at > self.stale_after_s

    def check(self) -> None:
        """Raise :class:`OutputLocked` if another job holds the lock (read only)."""
        current = self.holder()
        if current is not None and not self.stale(current[1]):
            raise OutputLocked(self._locked_message(current[1]))

    def _locked_message(self, info: LockInfo) -> str:
        return (f"{self.location.uri} is in use by {info.describe(time.time())}; two jobs "
                "writing one output would interleave their files. Wait for that job to "
                "finish, or choose another output location (a job that died leaves its lock "
                f"behind: it is taken over {self.stale_after_s:.0f} s after its last "
                f"heartbeat, or at once on the same host; to release it by hand, delete "
                f"{self.location.uri_for(LOCK_DIR)})")

    # -- taking and holding ---------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputLocked`; then keep it fresh in a thread."""
        for _ in range(5):
            current = self.holder()
            if current is not None and not self.stale(current[1]):
                raise OutputLocked(self._locked_message(current[1]))
            generation = current[0] + 1 if current else 1
            now = time.time()
            info = LockInfo(self.job_id, socket.gethostname(), os.getpid(),
                            secrets.token_hex(16), now, now)
            if self._create(generation, info):
                self.generation, self.info = generation, info
                self.took_over = current[1] if current else None
                if self.took_over is not None:
                    self.log(f"{self.location.uri}: took over the lock of "
                             f"{self.took_over.describe(now)}")
                self._remove_older(generation)
                self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                                name="vidprune-output-lock")
                self._thread.start()
                return
        current = self.holder()
        raise OutputLocked(self._locked_message(current[1]) if current else
                           f"{self.location.uri}: could not take the output lock (other "
                           "jobs kept taking it)")

    def _path(self, generation: int) -> str:
        return self.location.path(LOCK_DIR, _generation_name(generation))

    def _create(self, generation: int, info: LockInfo) -> bool:
        """Create this generation's file if it is absent; False if another job did."""
        data = json.dumps(asdict(info)).encode()
        path = self._path(generation)
        fs = self.location.fs
        if is_local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, fails if the name exists (NFS too)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except (FileNotFoundError, PermissionError):
            raise  # a missing bucket, denied access: for the user to fix, whatever the store
        except OSError as exc:  # the store refuses conditional writes: best effort
            self.log(f"{self.location.uri}: the store does not support conditional writes "
                     f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); the output "
                     "lock is best effort")
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return self._settled(generation, info)
        try:  # does the store honour the condition? A second create must fail.
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return True
        except OSError:
            pass
        self.log(f"{self.location.uri}: the store ignores conditional writes "
                 "(If-None-Match); the output lock is best effort")
        return self._settled(generation, info)

    def _settled(self, generation: int, info: LockInfo) -> bool:
        """Best effort without conditional writes: after a pause, is the file still ours?"""
        time.sleep(self.settle_s)
        back = self._read(generation)
        return back is not None and back.token == info.token \
            and max(self._generations()) == generation

    def _remove_older(self, generation: int) -> None:
        older = [_generation_name(g) for g in self._generations() if g < generation]
        try:
            self.location.remove_files(LOCK_DIR, older)
        except OSError:
            pass  # harmless leftovers: the highest generation is the holder

    def _heartbeat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
                last_ok = time.monotonic()
            except LockLost as exc:
                self._lost = str(exc)
                return
            except OSError as exc:
                # Others may take the lock once it is stale: stop well before that.
                if time.monotonic() - last_ok > self.stale_after_s - 2 * self.heartbeat_s:
                    self._lost = (f"the output lock could not be refreshed for "
                                  f"{time.monotonic() - last_ok:.0f} s ({exc})")
                    return

    def refresh(self) -> None:
        """Check that the lock is still this job's, then renew its heartbeat."""
        if self.generation is None or self.info is None:
            raise LockLost("the output lock is not held")
        newest = max(self._generations(), default=0)
        mine = self._read(self.generation)
        if newest > self.generation or mine is None or mine.token != self.info.token:
            other = self.holder()
            who = other[1].describe(time.time()) if other else "nobody (its file was removed)"
            raise LockLost(f"the output lock of {self.location.uri} was taken over; it is now "
                           f"held by {who}")
        self.info.heartbeat_at = time.time()
        self.location.write_bytes(posixpath.join(LOCK_DIR, _generation_name(self.generation)),
                                  json.dumps(asdict(self.info)).encode())

    @property
    def lost(self) -> str | None:
        """Why the lock was lost (None while it is held)."""
        return self._lost

    def ensure(self) -> None:
        if self._lost:
            raise LockLost(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.generation is None or self.info is None or self._lost:
            return
        try:
            mine = self._read(self.generation)
            if mine is not None and mine.token == self.info.token:
                self.location.remove_files(LOCK_DIR, [_generation_name(self.generation)])
        except OSError:
            pass  # a leftover lock goes stale; the next job takes it over
        self.generation = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
