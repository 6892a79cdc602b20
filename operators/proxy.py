"""A loopback HTTP range server that lets decord stream objects from any fsspec filesystem.

decord's bundled FFmpeg cannot open ``https://`` (it is built without TLS), but it streams
plain ``http://`` with range requests and seeks by issuing new ones. So each process that
decodes remote videos runs one small threaded server on ``127.0.0.1`` (random port) that
answers ``GET``/``HEAD`` with ``Range: bytes=...`` by ranged reads through the filesystem
(s3fs for S3, over HTTPS with the environment's credentials). decord is given
``http://127.0.0.1:PORT/<token>/video.<ext>``: the token is random and opaque, so object
names, endpoints, credentials and presigned signatures never appear in URLs, logs or errors.

Memory is bounded: a response is sent in chunks of at most ``chunk_bytes``, each one ranged
read, and a client that goes away (FFmpeg drops the connection when it seeks) just ends the
response.
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # a client dropping out is normal
        import sys

        if not isinstance(sys.exc_info()[1], _DISCONNECTS):
            super().handle_error(request, client_address)


class RangeProxy:
    """Serve registered fsspec objects on ``127.0.0.1`` for the life of the process."""

    def __init__(self, chunk_bytes: int = 4 << 20):
        self.chunk_bytes = chunk_bytes
        self._objects: dict[str, _Object] = {}
        self._lock = threading.Lock()
        self.requests = 0  # ranged reads served (for tests and diagnostics)
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
                        self.end_headers()
                        return
                    start, end = parsed
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{obj.size}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if not body:
                    return
                pos = start
                try:
                    while pos < end:
                        stop = min(end, pos + proxy.chunk_bytes)
                        data = obj.fs.cat_file(obj.path, start=pos, end=stop)
                        proxy.requests += 1
                        if not data:
                            break
                        self.wfile.write(data)
                        pos += len(data)
                except _DISCONNECTS:
                    self.close_connection = True
                except Exception:  # the store failed mid-response: cut it short
                    self.close_connection = True

            def _status(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="vidprune-range-proxy")
        self._thread.start()

    def register(self, fs: Any, path: str, size: int | None = None) -> str:
        """A loopback URL that serves ``path`` of ``fs``. The object's size comes from
        ``fs.info`` unless given (a missing object raises ``FileNotFoundError`` here, with
        a clear message, rather than as an opaque decoder error later)."""
        if size is None:
            size = int(fs.info(path)["size"])
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._objects[token] = _Object(fs, path, int(size))
        ext = posixpath.splitext(path)[1].lower()
        # The extension (only) helps FFmpeg pick a demuxer; the name itself stays private.
        ext = ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else ""
        return f"http://127.0.0.1:{self.port}/{token}/video{ext}"

    def unregister(self, url: str) -> None:
        token = url.split(f":{self.port}/", 1)[-1].split("/", 1)[0]
        with self._lock:
            self._objects.pop(token, None)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


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
    """The process's proxy, started on first use."""
    global _PROXY
    with _PROXY_LOCK:
        if _PROXY is None:
            _PROXY = RangeProxy()
        return _PROXY
