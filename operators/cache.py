"""A node-local disk cache of object-store ranges, shared by every process on the node.

Why: a segment's decoder indexes every packet when it opens a video (to number frames as
decord does; decord itself does the same), so *each* open reads the whole file. A long video split into N segments is opened N times (once per segment, on
whatever actor runs it): without a cache that is N times the file from the object store
(measured in docs/CLUSTER.md, "Traffic"). With it, the range proxy fetches each chunk of a
video at most once per node and serves later opens from local disk.

Layout: ``<root>/<key>/<chunk index>.chunk``, ``key`` a hash of the object's path, size and
identity (ETag or modification time), so a changed object never meets stale chunks. Chunks
are written to a temporary name and renamed (readers never see a partial chunk); one
process fetches a chunk while others wanting it wait on a per-chunk lock (``fcntl.flock``),
so actors opening the same video at the same moment do not fetch it twice. When the cache
holds more than its budget, the least recently used chunks go first.

Configured per node, not per job (disk is a property of the node): ``VIDPRUNE_CACHE_DIR``
(default: ``<temp dir>/vidprune-cache``) and ``VIDPRUNE_CACHE_BYTES`` (default: the smaller
of 16 GiB and a quarter of the free space there; 0 turns the cache off).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

DEFAULT_MAX_BYTES = 16 << 30


def cache_from_env(environ=os.environ) -> "ChunkCache | None":
    """The node's cache as the environment configures it (None when turned off)."""
    root = Path(environ.get("VIDPRUNE_CACHE_DIR") or
                Path(tempfile.gettempdir()) / "vidprune-cache")
    raw = environ.get("VIDPRUNE_CACHE_BYTES")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if raw is not None and raw.strip() != "":
            budget = int(float(raw))
        else:
            budget = min(DEFAULT_MAX_BYTES, shutil.disk_usage(root).free // 4)
    except (OSError, ValueError):
        return None
    return ChunkCache(root, budget) if budget > 0 else None


def object_identity(info: dict[str, Any]) -> str:
    """What changes when an object's content changes (from ``fs.info``): the ETag on object
    stores, size and modification time on local disks."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size:{info.get('size')}:mtime:{mtime}"


def object_key(path: str, size: int, identity: str) -> str:
    return hashlib.sha256(f"{path}\n{size}\n{identity}".encode()).hexdigest()[:32]


class ChunkCache:
    """Chunks of objects on local disk, at most ``max_bytes`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.hits = 0          # chunks served from disk (for tests and diagnostics)
        self.misses = 0        # chunks fetched from the store
        self._written = 0      # bytes added since the last sweep
        self._lock = threading.Lock()

    def get(self, key: str, index: int, fetch: Callable[[], bytes]) -> bytes:
        """Chunk ``index`` of object ``key``: from disk, or ``fetch()``-ed and kept."""
        folder = self.root / key
        path = folder / f"{index}.chunk"
        data = self._read(path)
        if data is not None:
            return data
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{index}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per chunk and node
            try:
                data = self._read(path)  # fetched by another process while we waited
                if data is not None:
                    return data
                data = fetch()
                with self._lock:
                    self.misses += 1
                self._store(path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return data

    def _read(self, path: Path) -> bytes | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        with self._lock:
            self.hits += 1
        return data

    def _store(self, path: Path, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # a full disk only costs the cache, never the read
            try:
                tmp.unlink()
            except OSError:
                pass
            return
        with self._lock:
            self._written += len(data)
            sweep = self._written > max(self.max_bytes // 8, 1)
            if sweep:
                self._written = 0
        if sweep:
            self.sweep()

    def sweep(self) -> int:
        """Remove least recently used chunks until the cache fits in 90% of its budget;
        returns the bytes removed. Other processes sweep too; a chunk removed while another
        process reads it stays readable through that open file."""
        chunks = []
        total = 0
        for entry in self.root.glob("*/*.chunk"):
            try:
                st = entry.stat()
            except OSError:
                continue
            chunks.append((st.st_mtime, st.st_size, entry))
            total += st.st_size
        removed = 0
        if total <= self.max_bytes:
            return 0
        target = int(self.max_bytes * 0.9)
        for _, size, entry in sorted(chunks):
            if total - removed <= target:
                break
            try:
                entry.unlink()
                removed += size
                entry.with_suffix(".lock").unlink(missing_ok=True)
            except OSError:
                pass
        return removed

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*.chunk") if p.exists())
