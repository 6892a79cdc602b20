"""Bad inputs, generated: every kind of file an archive holds that is not a clean video.

Each function writes a real file with FFmpeg (imageio-ffmpeg's binary) or edits a real one
byte by byte where FFmpeg would refuse to write it (a truncated upload, a codec nobody knows,
a header that lies about its frame count)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np


def ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
                    *args], check=True)


def video(path: Path, frames: int = 20, size: tuple[int, int] = (64, 48), fps: int = 10,
          faststart: bool = False, preset: str = "medium") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size[0]}x{size[1]}:rate={fps}",
           "-frames:v", str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "8",
           "-preset", preset, *(["-movflags", "+faststart"] if faststart else []), str(path))
    return path


def noise(path: Path, frames: int = 30) -> Path:
    """Random pixels, losslessly coded: ~360 KB a frame (a video larger than the range
    proxy's 4 MB cache chunks, whose middle no probe reads)."""
    ffmpeg("-f", "lavfi", "-i", "nullsrc=s=640x360:r=25,geq=lum='random(1)*255':cb=128:cr=128",
           "-frames:v", str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset",
           "ultrafast", "-qp", "0", str(path))
    return path


def truncated(src: Path, dst: Path, fraction: float) -> Path:
    """The first ``fraction`` of ``src``: an upload or copy cut short."""
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


def audio_only(path: Path) -> Path:
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(path))
    return path


def image(path: Path, codec: str) -> Path:
    """One frame as a PNG or JPEG file, whatever ``path``'s extension says."""
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48", "-frames:v", "1", "-c:v", codec,
           "-f", "image2", str(path))
    return path


def variable_frame_rate(path: Path) -> Path:
    """20 frames at 30 fps, then every third frame (10 fps): timestamps are not i / fps."""
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=30", "-frames:v", "40",
           "-vf", "select='lt(n,20)+not(mod(n,3))'", "-fps_mode", "vfr", "-pix_fmt", "yuv420p",
           "-c:v", "libx264", str(path))
    return path


def _boxes(data: bytes | bytearray, start: int, end: int):
    i = start
    while i + 8 <= end:
        size = int.from_bytes(data[i:i + 4], "big")
        if size < 8:
            return
        yield bytes(data[i + 4:i + 8]), i, size
        i += size


def find_box(data: bytes | bytearray, path: list[bytes], start: int = 0,
             end: int | None = None) -> int:
    """Offset of the box at ``path`` (``[b"moov", b"trak", ...]``) in an MP4."""
    end = len(data) if end is None else end
    for kind, offset, size in _boxes(data, start, end):
        if kind == path[0]:
            return offset if len(path) == 1 else find_box(data, path[1:], offset + 8,
                                                          offset + size)
    raise ValueError(f"no {path[0]!r} box")


_STBL = [b"moov", b"trak", b"mdia", b"minf", b"stbl"]


def unknown_codec(src: Path, dst: Path) -> Path:
    """``src`` with its video sample description renamed to a codec that does not exist."""
    data = bytearray(src.read_bytes())
    stsd = find_box(data, _STBL + [b"stsd"])
    data[stsd + 20:stsd + 24] = b"zzzz"  # first sample entry's format
    dst.write_bytes(data)
    return dst


def hostile_frame_count(src: Path, dst: Path) -> Path:
    """``src`` whose time-to-sample table claims 3.3 billion frames: decord sizes its index
    from it, the allocation throws std::bad_alloc and the process aborts (SIGABRT)."""
    data = bytearray(src.read_bytes())
    stts = find_box(data, _STBL + [b"stts"])
    data[stts + 16:stts + 20] = (0xC8000000).to_bytes(4, "big")  # first entry's count
    dst.write_bytes(data)
    return dst


def reference_frames(path: Path) -> np.ndarray:
    """Every frame of ``path`` as FFmpeg's own command line decodes it, (N, H, W, 3)."""
    import decord
    import imageio_ffmpeg

    height, width = decord.VideoReader(str(path))[0].shape[:2]
    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path),
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True,
                         check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)
