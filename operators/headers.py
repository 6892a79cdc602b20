"""Probing a video from its container header alone, where the header can be trusted.

decord opens a video by reading every packet of it (to index key frames), so a decord probe
costs a full read of the file: on an object store, the whole archive once more before any
work starts. MP4 and QuickTime files (and their 3GP/M4V cousins) list every sample of a
track in their header (``stsz``), and FFmpeg's demuxer returns one packet per sample, so the
frame count decord would find is in the header; PyAV reads it (and the frame rate and
duration) without touching the media data, then decodes the first frame only, for the frame
size as decord reports it (turned upright when the file says it is rotated).

Only for that container family, and only when the header gives a frame count, a frame rate
and a frame size; anything else returns None and the caller falls back to decord. On an
object store, PyAV reads through :class:`RangeFile` (ranged reads in small blocks, exactly
what the demuxer asks for, not the HTTP proxy, whose streamed responses run ahead of the
reader): the start of the file, the ``moov`` box (at the end of files written without
``faststart``) and the first key frame.
"""

from __future__ import annotations

import io
from typing import Any

#: FFmpeg's name for the ISO base media file format demuxer.
_ISO_BMFF = "mov,mp4,m4a,3gp,3g2,mj2"
_EXTENSIONS = (".mp4", ".m4v", ".mov", ".3gp", ".3g2")


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over ranged reads of an fsspec object, in blocks of
    ``block_bytes`` (one block kept): PyAV reads exactly what the demuxer asks for, with no
    read-ahead beyond one block. ``bytes_fetched`` counts what came from the store."""

    def __init__(self, fs: Any, path: str, size: int, block_bytes: int = 256 << 10):
        self.fs, self.path, self.size, self.block_bytes = fs, path, int(size), block_bytes
        self.pos = 0
        self.bytes_fetched = 0
        self._block_start, self._block = -1, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        if self.pos >= self.size:
            return 0
        start = self.pos - self.pos % self.block_bytes
        if start != self._block_start:
            from .retry import retry

            end = min(self.size, start + self.block_bytes)
            self._block = retry(lambda: self.fs.cat_file(self.path, start=start, end=end),
                                "reading a video's header")
            self._block_start = start
            self.bytes_fetched += len(self._block)
        data = self._block[self.pos - start:self.pos - start + len(buffer)]
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def header_probe(fs: Any, uri: str, size_bytes: int | None = None,
                 stats: dict[str, int] | None = None) -> dict[str, Any] | None:
    """``frames_total``, ``fps``, ``width``, ``height`` and ``duration_s`` from the
    header of an MP4/MOV file, or None where the header cannot stand in for decord.
    ``stats``, when given, receives ``bytes_fetched`` (object stores)."""
    if not uri.lower().endswith(_EXTENSIONS):
        return None
    try:
        import av
    except ImportError:  # pragma: no cover - PyAV comes with the dependencies
        return None
    from fsspec.implementations.local import LocalFileSystem

    source: Any = None
    try:
        if isinstance(fs, LocalFileSystem):
            target: Any = uri[len("file://"):] if uri.startswith("file://") else uri
        else:
            path = uri.split("://", 1)[-1]
            size = size_bytes if size_bytes is not None else int(fs.info(path)["size"])
            source = target = RangeFile(fs, path, size)
        with av.open(target, "r") as container:
            if container.format.name != _ISO_BMFF or not container.streams.video:
                return None
            stream = container.streams.video[0]
            frames = int(stream.frames or 0)
            fps = float(stream.average_rate or 0)
            # The first frame (one key frame's worth of data) says how the video is turned:
            # decord hands out frames turned upright, so a quarter turn swaps the sides.
            first = next(container.decode(stream), None)
            if first is None:
                return None
            width, height = int(first.width), int(first.height)
            if int(getattr(first, "rotation", 0) or 0) % 180:
                width, height = height, width
            if frames <= 0 or fps <= 0 or width <= 0 or height <= 0:
                return None
            duration_s = (float(stream.duration * stream.time_base)
                          if stream.duration and stream.time_base else frames / fps)
            return {"frames_total": frames, "fps": fps, "width": width, "height": height,
                    "duration_s": duration_s}
    except Exception:  # unreadable here: decord's probe says why, in its own words
        return None
    finally:
        if source is not None and stats is not None:
            stats["bytes_fetched"] = stats.get("bytes_fetched", 0) + source.bytes_fetched
