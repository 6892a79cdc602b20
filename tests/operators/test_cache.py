"""Traffic to the object store: decord reads a whole video every time it opens it, so the
segments of one video multiply what is read; the node's chunk cache makes it one fetch per
node, and MP4/MOV probes read only the container header."""

import subprocess
import threading

import imageio_ffmpeg
import pytest
from fsspec.implementations.local import LocalFileSystem

from operators.cache import ChunkCache, cache_from_env
from operators.decode import SegmentDecoder, probe
from operators.headers import header_probe
from operators.proxy import RangeProxy
from pipeline.storage import filesystem
from tests.conftest import make_video


def test_chunks_are_fetched_once_and_the_least_recently_used_go_first(tmp_path):
    cache = ChunkCache(tmp_path / "c", max_bytes=10_000)
    fetches = []
    barrier = threading.Barrier(4)

    def fetch(i):
        def f():
            fetches.append(i)
            return bytes([i]) * 1000
        return f

    def reader():
        barrier.wait()  # four readers want chunk 0 at the same moment
        assert cache.get("k", 0, fetch(0)) == bytes([0]) * 1000

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetches == [0]  # one fetch; the others waited and read it from disk
    for i in range(1, 12):  # 12,000 bytes into a 10,000-byte cache
        cache.get("k", i, fetch(i))
        if i == 5:
            cache.get("k", 0, fetch(0))  # chunk 0 used again: it is recent now
    assert cache.size_bytes() <= 10_000
    kept = {int(p.stem) for p in (tmp_path / "c" / "k").glob("*.chunk")}
    assert 0 in kept and 11 in kept and 1 not in kept
    assert not list((tmp_path / "c" / "k").glob(".*"))  # no temporaries left

    assert cache_from_env({"VIDPRUNE_CACHE_DIR": str(tmp_path / "e"),
                           "VIDPRUNE_CACHE_BYTES": "0"}) is None
    configured = cache_from_env({"VIDPRUNE_CACHE_DIR": str(tmp_path / "e"),
                                 "VIDPRUNE_CACHE_BYTES": "5e6"})
    assert configured.max_bytes == 5_000_000 and configured.root == tmp_path / "e"


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("v") / "long.mp4", 300, size=(160, 120), gop=25)


def decode_segments(fs, uri, size, proxy, monkeypatch, spans):
    import operators.proxy as proxy_module

    monkeypatch.setattr(proxy_module, "_PROXY", proxy)
    for start, end in spans:
        d = SegmentDecoder(fs, uri, list(range(start, end)), size_bytes=size)
        n = 0
        while d.read() is not None:
            n += 1
        assert d.error is None and n == end - start


def test_segments_of_one_video_fetch_it_once_per_node(s3, long_video, tmp_path, monkeypatch):
    fs, _ = filesystem("s3://videos", endpoint_url=s3.endpoint_url)
    fs.mkdir("videos")
    fs.put(str(long_video), "videos/long.mp4")
    size = long_video.stat().st_size
    spans = [(0, 20), (100, 120), (280, 300)]  # three segments, opened one after another

    plain = RangeProxy(chunk_bytes=64 << 10)
    decode_segments(fs, "s3://videos/long.mp4", size, plain, monkeypatch, spans)
    # Without a cache every open reads (at least) the whole file again.
    assert plain.bytes_fetched >= 3 * size

    cached = RangeProxy(chunk_bytes=64 << 10, cache=ChunkCache(tmp_path / "cache", 1 << 30))
    decode_segments(fs, "s3://videos/long.mp4", size, cached, monkeypatch, spans)
    assert cached.bytes_fetched == size  # each chunk once
    assert cached.bytes_served >= 3 * size and cached.cache.hits > 0

    # A new version of the object (new ETag) never meets the old one's chunks.
    fs.put(str(make_video(tmp_path / "other.mp4", 40, size=(160, 120))), "videos/long.mp4")
    new_size = fs.info("videos/long.mp4")["size"]
    before = cached.bytes_fetched
    decode_segments(fs, "s3://videos/long.mp4", new_size, cached, monkeypatch, [(0, 40)])
    assert cached.bytes_fetched - before == new_size


def test_mp4_headers_stand_in_for_decord_probes(s3, sample_videos, tmp_path):
    local = LocalFileSystem()
    seen = 0
    for path in sorted(sample_videos.iterdir()):
        if path.suffix == ".md":
            continue
        header = header_probe(local, str(path))
        if path.suffix.lower() not in (".mp4", ".mov"):
            assert header is None, path.name  # other containers: decord decides
            continue
        full = probe(local, str(path))
        assert header is not None, path.name
        seen += 1
        for key in ("frames_total", "width", "height"):
            assert header[key] == full[key], (path.name, key)
        assert header["fps"] == pytest.approx(full["fps"])
        assert header["duration_s"] == pytest.approx(full["duration_s"], abs=0.05)
    assert seen == 6
    assert header_probe(local, str(tmp_path / "missing.mp4")) is None
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 5000)
    assert header_probe(local, str(tmp_path / "junk.mp4")) is None

    # From the object store: a small part of the file instead of all of it (an 11 MB
    # video; the header probe's reads are about the same for any length).
    big = tmp_path / "big.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", "testsrc2=size=640x360:rate=25", "-frames:v", "500", "-pix_fmt",
                    "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", "-b:v", "20M",
                    str(big)], check=True)
    fs, _ = filesystem("s3://videos", endpoint_url=s3.endpoint_url)
    fs.mkdir("videos")
    fs.put(str(big), "videos/big.mp4")
    size = big.stat().st_size
    stats = {}
    info = header_probe(fs, "s3://videos/big.mp4", size, stats=stats)
    assert info["frames_total"] == 500 and (info["width"], info["height"]) == (640, 360)
    assert stats["bytes_fetched"] < size / 10
