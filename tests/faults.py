"""An unreliable object store for tests: an HTTP front on 127.0.0.1 that forwards requests
to the moto S3 server, except those a rule says to fail (with a real S3 error reply) or to
stall (no answer at all, as from a hung connection, until the front closes).

    front = FlakyFront(s3.port)
    front.fail("PUT", r"/runs/out/segments/", times=3)     # the next 3 matching PUTs: 500
    front.stall("GET", r"/videos/slow\.mp4")               # every matching GET hangs
    fs, _ = filesystem("s3://runs", endpoint_url=front.url)

``deny_writes(location)`` sets a bucket policy that lets the tests read a bucket but not
write there (403 Access Denied, as for read-only credentials).
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
           503: ("ServiceUnavailable", "Please reduce your request rate."),
           403: ("AccessDenied", "Access Denied")}


@dataclass
class Rule:
    method: str
    pattern: re.Pattern
    times: int
    status: int


class FlakyFront:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.rules: list[Rule] = []
        self.stalling: list[tuple[str, re.Pattern]] = []
        self.failed = 0            # requests answered with an error
        self.stalled = 0           # requests left without an answer
        self.forwarded = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if front._stalls(self.command, self.path):
                    front._release.wait(300)
                    self.close_connection = True
                    return
                status = front._failure(self.command, self.path)
                if status:
                    code, message = _ERRORS.get(status, ("InternalError", "error"))
                    data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                            f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", front.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                with front._lock:
                    front.forwarded += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" \
                    else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail(self, method: str, pattern: str, times: int, status: int = 500) -> None:
        """Answer the next ``times`` ``method`` requests whose path matches ``pattern``
        (a regular expression) with ``status``."""
        with self._lock:
            self.rules.append(Rule(method, re.compile(pattern), times, status))

    def stall(self, method: str, pattern: str) -> None:
        """Leave every ``method`` request whose path matches ``pattern`` unanswered."""
        with self._lock:
            self.stalling.append((method, re.compile(pattern)))

    def heal(self) -> None:
        with self._lock:
            self.rules.clear()
            self.stalling.clear()

    def _stalls(self, method: str, path: str) -> bool:
        with self._lock:
            hit = any(m == method and p.search(path) for m, p in self.stalling)
            self.stalled += hit
            return hit

    def _failure(self, method: str, path: str) -> int | None:
        with self._lock:
            for rule in self.rules:
                if rule.method == method and rule.times > 0 and rule.pattern.search(path):
                    rule.times -= 1
                    self.failed += 1
                    return rule.status
        return None

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def deny_writes(location) -> None:
    """A bucket policy on the moto server that lets the tests' credentials read the bucket of
    ``location`` (a ``pipeline.storage.Location``) but not write or delete there: PUTs are
    answered 403, as for read-only credentials."""
    import json

    bucket = location.root.split("/", 1)[0]
    location.fs.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": ["s3:PutObject", "s3:DeleteObject"],
            "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
