"""The loopback range proxy: HTTP range semantics, clients that hang up, and decord streaming
a video from the S3 server through it."""

import http.client
import socket

import decord
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from operators.decode import SegmentDecoder
from operators.proxy import RangeProxy
from pipeline.storage import filesystem


@pytest.fixture
def proxy():
    p = RangeProxy(chunk_bytes=1000)
    yield p
    p.close()


@pytest.fixture
def blob(tmp_path):
    data = bytes(range(256)) * 40  # 10,240 bytes
    path = tmp_path / "blob.mp4"
    path.write_bytes(data)
    return str(path), data


def request(url: str, method: str = "GET", headers: dict | None = None):
    host, _, rest = url[len("http://"):].partition("/")
    conn = http.client.HTTPConnection(host, timeout=10)
    conn.request(method, "/" + rest, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_range_requests(proxy, blob):
    path, data = blob
    url = proxy.register(LocalFileSystem(), path)
    assert url.endswith("/video.mp4") and "blob" not in url  # the name stays private

    resp, body = request(url, "HEAD")
    assert resp.status == 200 and resp.getheader("Content-Length") == str(len(data))
    assert resp.getheader("Accept-Ranges") == "bytes" and body == b""

    resp, body = request(url, headers={"Range": "bytes=10-19"})
    assert resp.status == 206 and body == data[10:20]
    assert resp.getheader("Content-Range") == f"bytes 10-19/{len(data)}"

    before = proxy.requests
    resp, body = request(url, headers={"Range": "bytes=500-"})  # open-ended: many chunks
    assert resp.status == 206 and body == data[500:]
    assert proxy.requests - before == 10  # 9,740 bytes in reads of at most 1,000

    resp, body = request(url, headers={"Range": "bytes=-5"})
    assert body == data[-5:]
    resp, body = request(url)
    assert resp.status == 200 and body == data

    resp, _ = request(url, headers={"Range": f"bytes={len(data)}-"})
    assert resp.status == 416
    resp, _ = request(url.replace(url.split("/")[3], "no-such-token"))
    assert resp.status == 404
    proxy.unregister(url)
    assert request(url)[0].status == 404


def test_a_client_that_hangs_up_mid_response_is_harmless(proxy, blob, capsys):
    path, data = blob
    big = path + ".big"
    with open(big, "wb") as f:
        f.write(data * 200)  # 2 MB: more than the socket buffers hold
    url = proxy.register(LocalFileSystem(), big)
    host, port = "127.0.0.1", proxy.port
    token_path = "/" + url.split("/", 3)[3]
    for _ in range(3):  # what FFmpeg does on every seek
        s = socket.create_connection((host, port))
        s.sendall(f"GET {token_path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 206")
        s.close()
    resp, body = request(url, headers={"Range": "bytes=0-99"})
    assert resp.status == 206 and body == (data * 200)[:100]
    assert "Traceback" not in capsys.readouterr().err


def test_decoding_from_s3_through_the_proxy_equals_the_local_file(s3, sample_videos):
    local = str(sample_videos / "mma_test.mp4")
    fs, _ = filesystem("s3://videos/a", endpoint_url=s3.endpoint_url)
    fs.mkdir("videos")
    fs.put(local, "videos/a/clip.mp4")

    indices = list(range(100, 300, 7))  # starts mid-video: seeks, then skips ahead
    remote = SegmentDecoder(fs, "s3://videos/a/clip.mp4", indices)
    reference = decord.VideoReader(local)
    n = 0
    while (frame := remote.read()) is not None:
        assert np.array_equal(frame.rgb, reference[frame.index].asnumpy())
        n += 1
    assert remote.error is None and n == len(indices)

    gone = SegmentDecoder(fs, "s3://videos/a/missing.mp4", [0])
    assert gone.read() is None and "the file is gone" in gone.error
