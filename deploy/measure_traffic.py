"""Bytes read from an object store to probe a video and to decode segments of it, with and
without the node-local chunk cache (the numbers in docs/CLUSTER.md, "Traffic").

    PYTHONPATH=. python deploy/measure_traffic.py [--frames 3000] [--segments 8]

Runs a moto S3 server on 127.0.0.1 (moto[server], a test dependency), uploads one generated
H.264 MP4 (640x360, 25 fps, 6 Mb/s, no faststart: its moov box is at the end) and the same
stream remuxed to MKV, then counts what the range proxy fetched from the store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--segments", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import imageio_ffmpeg

    from tests.conftest import S3Server

    server = S3Server()
    os.environ.update(server.env)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    try:
        from operators import proxy as proxy_module
        from operators.cache import ChunkCache
        from operators.decode import SegmentDecoder, probe
        from operators.headers import header_probe
        from operators.proxy import RangeProxy
        from pipeline.storage import filesystem

        tmp = Path(tempfile.mkdtemp())
        video = tmp / "v.mp4"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f",
                        "lavfi", "-i", "testsrc2=size=640x360:rate=25", "-frames:v",
                        str(args.frames), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset",
                        "ultrafast", "-b:v", "6M", "-g", "50", str(video)], check=True)
        # the same stream in Matroska, which has no header to read the frame count from
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i",
                        str(video), "-c", "copy", str(tmp / "v.mkv")], check=True)
        size = video.stat().st_size
        fs, _ = filesystem("s3://videos", endpoint_url=server.endpoint_url)
        fs.mkdir("videos")
        fs.put(str(video), "videos/v.mp4")
        fs.put(str(tmp / "v.mkv"), "videos/v.mkv")
        uri = "s3://videos/v.mp4"
        rows = [("file size", size)]

        proxy_module._PROXY = RangeProxy()
        probe(fs, "s3://videos/v.mkv", (tmp / "v.mkv").stat().st_size)
        rows.append(("full probe: the same stream as MKV (every packet read)",
                     proxy_module._PROXY.bytes_fetched))
        stats: dict[str, int] = {}
        header_probe(fs, uri, size, stats=stats)
        rows.append(("header probe (MP4/MOV)", stats["bytes_fetched"]))

        span = args.frames // args.segments
        for name, cache in (("no cache", None),
                            ("node cache", ChunkCache(tmp / "cache", 1 << 34))):
            proxy_module._PROXY = RangeProxy(cache=cache)
            for k in range(args.segments):  # 25 frames from each segment, as actors would
                d = SegmentDecoder(fs, uri, list(range(k * span, k * span + 25)),
                                   size_bytes=size)
                while d.read() is not None:
                    pass
                assert d.error is None, d.error
            rows.append((f"{args.segments} segments opened, {name}",
                         proxy_module._PROXY.bytes_fetched))
        print(f"| what ({args.frames} frames, {size / 1e6:.1f} MB) | MB fetched | x file |")
        print("|---|---:|---:|")
        for label, n in rows:
            print(f"| {label} | {n / 1e6:.1f} | {n / size:.2f} |")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
