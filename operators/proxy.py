"""A loopback HTTP range server that lets the decoder stream objects from any fsspec filesystem.

The decoder (FFmpeg, in a child process without credentials: ``operators/isolation.py``)
streams plain ``http://`` with range requests and seeks by issuing new ones. So each process
that decodes remote videos runs one small threaded server on ``127.0.0.1`` (random port) that
answers ``GET``/``HEAD`` with ``Range: bytes=...`` by ranged reads through the filesystem
(s3fs for S3, over HTTPS with the environment's credentials). The decoder is given
``http://127.0.0.1:PORT/<token>/video.<ext>``: the token is random and opaque, so object
names, endpoints, credentials and presigned signatures never appear in URLs, logs or errors.
The first read of a response happens before its status line, so an object that vanished or
became unreadable after it was listed answers 404 or 403, and :meth:`RangeProxy.failure`
tells the decoder's caller the store's own error.

Memory is bounded: a response is sent in chunks of at most ``chunk_bytes``, each one ranged
read, and a client that goes away (FFmpeg drops the connection when it seeks) just ends the
response.

Each ranged read is retried with backoff on transient store errors (``operators/retry.py``);
one that still fails cuts the response short, which the decoder reports as the segment's
error. With a :class:`operators.cache.ChunkCache` (the shared proxy uses the node's), reads
are whole aligned chunks kept on local disk: the decoder reads every packet of a file each
time it opens it (to number frames), and the cache turns the N opens of a video split into
N segments into one fetch per node.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


@dataclass
class _Object:
    fs: Any
    path: str
    size: int
    key: str | None = None  # its key in the chunk cache (None: not cached)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # a client dropping out is normal
        import sys

        if not isinstance(sys.exc_info()[1], _DISCONNECTS):
            super().handle_error(request, client_address)


class RangeProxy:
    """Serve registered fsspec objects on ``127.0.0.1`` for the life of the process."""

    def __init__(self, chunk_bytes: int = 4 << 20, cache: Any = None, backoff: Any = None):
        self.chunk_bytes = chunk_bytes
        self.cache = cache
        self.backoff = backoff
        self._objects: dict[str, _Object] = {}
        self._failures: dict[str, BaseException] = {}  # first store error per object
        self._lock = threading.Lock()
        self.requests = 0       # ranged reads served (for tests and diagnostics)
        self.bytes_served = 0   # bytes sent to clients
        self.bytes_fetched = 0  # bytes read from the store (cache misses only)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: FFmpeg reconnects on every seek
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                token = self.path.lstrip("/").split("/", 1)[0]
                obj = proxy._objects.get(token)
                if obj is None:
                    self._status(404)
                    return
                start, end = 0, obj.size  # end exclusive
                header = self.headers.get("Range")
                if header:
                    parsed = _parse_range(header, obj.size)
                    if parsed is None:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{obj.size}")
                        self.send_header("Content-Length", "0")
                        self._connection_header()
                        self.end_headers()
                        return
                    start, end = parsed
                first = b""
                if body and end > start:
                    # The first read comes before the status line, so that an object that
                    # vanished or became unreadable since it was listed answers 404/403
                    # (and the decoder's caller learns why) instead of a body cut short.
                    try:
                        first = self._read(obj, token, start, end)
                    except Exception as exc:  # the store's error: recorded for the caller
                        self._status(404 if isinstance(exc, FileNotFoundError) else
                                     403 if isinstance(exc, PermissionError) else 502)
                        return
                if header:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{obj.size}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start))
                self._connection_header()
                self.end_headers()
                if not body:
                    return
                pos = start
                try:
                    data = first
                    while data:
                        self.wfile.write(data)
                        proxy.bytes_served += len(data)
                        pos += len(data)
                        if pos >= end:
                            break
                        data = self._read(obj, token, pos, end)
                except _DISCONNECTS:
                    self.close_connection = True
                except Exception:  # the store failed mid-response (recorded): cut it short
                    self.close_connection = True

            def _read(self, obj: _Object, token: str, pos: int, end: int) -> bytes:
                """At most one chunk from ``pos`` (see ``RangeProxy._read``); the store's
                error is recorded for :meth:`RangeProxy.failure`."""
                try:
                    data = proxy._read(obj, pos, end)
                except Exception as exc:
                    with proxy._lock:
                        proxy._failures.setdefault(token, exc)
                    raise
                proxy.requests += 1
                return data

            def _status(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self._connection_header()
                self.end_headers()

            def _connection_header(self) -> None:
                # Say so when the connection closes after this response: FFmpeg 8 reuses a
                # drained HTTP/1.1 connection for its next range request unless told.
                if self.close_connection:
                    self.send_header("Connection", "close")

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="vidprune-range-proxy")
        self._thread.start()

    def _read(self, obj: _Object, pos: int, end: int) -> bytes:
        """Bytes from ``pos`` up to at most one chunk (never past ``end``)."""
        from .retry import retry

        def fetch(start: int, stop: int) -> bytes:
            data = retry(lambda: obj.fs.cat_file(obj.path, start=start, end=stop),
                         f"reading bytes {start}-{stop - 1} of a video", self.backoff)
            self.bytes_fetched += len(data)
            return data

        if obj.key is None:
            return fetch(pos, min(end, pos + self.chunk_bytes))
        size = self.chunk_bytes
        index = pos // size
        first = index * size
        chunk = self.cache.get(obj.key, index,
                               lambda: fetch(first, min(obj.size, first + size)))
        return chunk[pos - first:min(end, first + size) - first]

    def register(self, fs: Any, path: str, size: int | None = None) -> str:
        """A loopback URL that serves ``path`` of ``fs``. The object's size comes from
        ``fs.info`` unless given (a missing object raises ``FileNotFoundError`` here, with
        a clear message, rather than as an opaque decoder error later); with a cache, so
        does its identity (its cache key must change when the object does)."""
        key = None
        if size is None or self.cache is not None:
            from .retry import retry

            info = retry(lambda: fs.info(path), "looking up a video", self.backoff)
            size = int(info["size"])
            if self.cache is not None:
                from .cache import object_identity, object_key

                key = object_key(f"{getattr(fs, 'protocol', '')}:{path}", size,
                                 object_identity(info))
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._objects[token] = _Object(fs, path, int(size), key)
        ext = posixpath.splitext(path)[1].lower()
        # The extension (only) helps FFmpeg pick a demuxer; the name itself stays private.
        ext = ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else ""
        return f"http://127.0.0.1:{self.port}/{token}/video{ext}"

    def unregister(self, url: str) -> None:
        token = _token(url, self.port)
        with self._lock:
            self._objects.pop(token, None)
            self._failures.pop(token, None)

    def failure(self, url: str) -> BaseException | None:
        """The first error the store raised while serving ``url`` (None: no error)."""
        with self._lock:
            return self._failures.get(_token(url, self.port))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _token(url: str, port: int) -> str:
    return url.split(f":{port}/", 1)[-1].split("/", 1)[0]


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` to a [start, end) span, None if invalid."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # the last n bytes
        n = int(last)
        if n == 0:
            return None
        return max(0, size - n), size
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size or end <= start:
        return None
    return start, end


_PROXY: RangeProxy | None = None
_PROXY_LOCK = threading.Lock()


def shared_proxy() -> RangeProxy:
    """The process's proxy, started on first use, with the node's chunk cache
    (``operators/cache.py``)."""
    global _PROXY
    with _PROXY_LOCK:
        if _PROXY is None:
            from .cache import cache_from_env

            _PROXY = RangeProxy(cache=cache_from_env())
        return _PROXY
