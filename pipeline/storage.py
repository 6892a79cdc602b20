"""Where bytes live: a URI and a job's ``storage`` options become an fsspec filesystem.

Two kinds of location are supported: local paths (``/data/videos``, ``file:///data/videos``)
and S3 or S3-compatible stores (``s3://bucket/prefix``, with ``endpoint_url`` for MinIO,
Ceph, R2 ...). Credentials are never passed here: s3fs (botocore) reads them from the
environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, instance
roles), so a filesystem object carries no secret when it is pickled to a Ray worker.

Writes of small files are atomic for readers: one PUT on an object store (an object appears
whole or not at all), a temporary name then ``os.replace`` on a local disk. A
:class:`Location`'s reads, writes and listings are retried with backoff on transient errors
(``operators/retry.py``); a write that still fails raises, so a segment whose results could
not be stored is never marked complete.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from operators.cache import object_identity as identity  # noqa: F401  (re-exported)
from operators.retry import retry

SCHEMES = ("file", "s3")


class StorageError(OSError):
    """A location could not be reached or read (not found, no permission, bad endpoint)."""


def scheme_of(uri: str) -> str:
    """``s3`` for ``s3://...``; ``file`` for a local path or ``file://`` URI."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def filesystem(uri: str, endpoint_url: str | None = None, region: str | None = None,
               anon: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path to pass to its methods."""
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if scheme == "s3":
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if endpoint_url:
            client_kwargs["endpoint_url"] = endpoint_url
        if region:
            client_kwargs["region_name"] = region
        # No listing cache: a job lists, writes and lists again (resume) and must see its
        # own writes. skip_instance_cache: options differ between jobs in one process.
        fs = s3fs.S3FileSystem(anon=anon, client_kwargs=client_kwargs,
                               use_listings_cache=False, skip_instance_cache=True)
        return fs, uri.split("://", 1)[1].rstrip("/")
    raise StorageError(f"unsupported location {uri!r}: use a local path or s3://bucket/prefix")


def uri_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a user would write for ``path`` on ``fs`` (local paths stay plain paths)."""
    return path if is_local(fs) else f"s3://{path}"


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that no reader ever sees a partial file."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


#: File systems of the kernel's own objects (``/proc``, ``/sys`` ...): they take no new files,
#: whatever the permissions say (for root, ``os.access`` calls ``/proc`` writable).
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs", "securityfs",
    "pstore", "bpf", "configfs", "efivarfs", "fusectl", "binfmt_misc", "mqueue"})


def _mount_type(path: str) -> str | None:
    """The file system type of the mount that holds ``path`` (Linux; None elsewhere)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.split():
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, tail.split()[0]
    return kind


def local_write_problem(folder: str) -> str | None:
    """Why files cannot be written under the local ``folder`` (created if missing), or None
    when they can, as far as can be told without writing: the folder, or its nearest
    existing parent, must be a writable folder on a file system that takes files."""
    folder = os.path.abspath(os.path.expanduser(folder))
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{existing} is a symbolic link to something that does not exist"
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    kind = _mount_type(os.path.realpath(existing))
    if kind in PSEUDO_FILESYSTEMS:
        return (f"{existing} is on a {kind} file system, where no files can be created"
                if existing == folder else
                f"{folder} cannot be created: {existing} is on a {kind} file system, where "
                "no files can be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        return f"{existing} is on a read-only file system" if read_only else \
            f"permission denied: {existing} is not writable for this user"
    return None


def s3_bucket_problem(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """``the bucket B does not exist`` when the bucket of ``path`` is missing, else None
    (a bucket this user may not look at is left to the first write to judge). Reads only."""
    if not hasattr(fs, "call_s3"):  # not an S3 file system: nothing to ask
        return None
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return f"the bucket {bucket} does not exist"
    except OSError:  # denied, unreachable ...: the first write says
        pass
    return None


def write_problem(exc: BaseException, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A failed write of ``path`` on ``fs`` in words a user can act on (no traceback)."""
    from operators.redact import redact

    if is_local(fs):
        if isinstance(exc, IsADirectoryError):
            return f"{exc.filename or path} is a folder"
        problem = local_write_problem(os.path.dirname(path))
        if problem:
            return problem
    if isinstance(exc, PermissionError):
        return "access denied"
    if isinstance(exc, FileNotFoundError) and not is_local(fs):
        return f"the bucket {path.split('/', 1)[0]} does not exist"
    text = " ".join((str(exc) or type(exc).__name__).split())
    return redact(text)[:300]


@dataclass
class Location:
    """A folder on a filesystem (a job's output), addressed by relative names."""

    fs: fsspec.AbstractFileSystem
    root: str   # filesystem path, no trailing slash
    uri: str    # as the user wrote it (for messages)

    @classmethod
    def open(cls, uri: str, endpoint_url: str | None = None, region: str | None = None,
             anon: bool = False) -> "Location":
        fs, root = filesystem(uri, endpoint_url, region, anon)
        return cls(fs, root.rstrip("/") or "/", uri)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def uri_for(self, *parts: str) -> str:
        return uri_of(self.fs, self.path(*parts))

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.path(name)
        retry(lambda: write_atomic(self.fs, path, data), f"writing {self.uri_for(name)}")

    def read_bytes(self, name: str) -> bytes:
        path = self.path(name)
        return retry(lambda: self.fs.cat_file(path), f"reading {self.uri_for(name)}")

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name) if name else self.root)

    def entries(self) -> list[str]:
        """Names directly under the root (empty when the root does not exist)."""
        try:
            listed = retry(lambda: self.fs.ls(self.root, detail=False),
                           f"listing {self.uri}")
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in listed
                      if p.rstrip("/") != self.root)

    def files(self, folder: str) -> list[str]:
        """Names of the files in ``folder`` (not recursive; empty when it does not exist)."""
        try:
            listed = retry(lambda: self.fs.ls(self.path(folder), detail=True),
                           f"listing {self.uri_for(folder)}")
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in listed
                      if e.get("type") == "file")

    def remove(self, name: str) -> None:
        """Remove a file or a folder (recursively); nothing if it does not exist."""
        target = self.path(name)
        try:
            if self.fs.isdir(target):
                self.fs.rm(target, recursive=True)
            elif self.fs.exists(target):
                self.fs.rm(target)
        except FileNotFoundError:
            pass

    def remove_files(self, folder: str, names: list[str]) -> None:
        if names:
            paths = [self.path(folder, n) for n in names]
            for start in range(0, len(paths), 1000):  # S3 DeleteObjects takes 1000 keys
                self.fs.rm(paths[start:start + 1000])


def parquet_bytes(table) -> bytes:
    """A pyarrow table as the bytes of one Parquet file."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem):
    """A pyarrow filesystem over ``fs`` (for reading folders of Parquet files)."""
    import pyarrow.fs as pafs

    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
