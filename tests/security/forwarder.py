"""An HTTP forwarder in front of the S3 server that can stall the reads of chosen objects:
a store that stops answering in the middle of a job (a hung connection, a dead node behind
a load balancer), on the real S3 protocol."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-connection"}


class StallingForwarder:
    """Forwards every request to ``upstream`` (``host:port``); GETs of keys containing one
    of :attr:`stalled` get no answer until :meth:`close`."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.stalled: set[str] = set()
        self.stalls = 0
        self.release = threading.Event()
        forwarder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and any(k in self.path for k in forwarder.stalled):
                    forwarder.stalls += 1
                    forwarder.release.wait(300)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(forwarder.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
