"""Probing a video from its container header alone, where the header can be trusted.

A full probe opens a video by reading every packet of it (to number frames, as decord
did), so it costs a full read of the file: on an object store, the whole archive once more
before any work starts. MP4 and QuickTime files (and their 3GP/M4V cousins) list every sample of a
track in their header (``stsz``), and FFmpeg's demuxer returns one packet per sample, so the
frame count decord would find is in the header; PyAV reads it (and the frame rate and
duration) without touching the media data, then decodes the first frame only, for the frame
size as decord reports it (turned upright when the file says it is rotated).

Only for that container family, and only when the header gives a frame count, a frame rate
and a frame size that the file can hold (a header may claim billions of frames: more frames
than bytes is not believed) and the file's top-level boxes are all there (a truncated
upload is probed in full, which counts what it really holds); anything else returns None and
the caller falls back to the full probe. PyAV reads through :class:`RangeFile` (ranged reads
in small blocks, exactly what the demuxer asks for, not the HTTP proxy's streamed responses,
which run ahead of the reader): the start of the file, the ``moov`` box (at the end of files
written without ``faststart``) and the first key frame. In a job this runs in the decoder
child (``operators/decode.py``), which reads the store's bytes through the loopback proxy
with exact ``Range`` requests (:func:`http_ranges`).
"""

from __future__ import annotations

import io
from typing import Any, Callable

#: FFmpeg's name for the ISO base media file format demuxer.
_ISO_BMFF = "mov,mp4,m4a,3gp,3g2,mj2"
_EXTENSIONS = (".mp4", ".m4v", ".mov", ".3gp", ".3g2")


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over ranged reads of an fsspec object (or of anything
    ``fetch(start, end)`` reads), in blocks of ``block_bytes`` (one block kept): PyAV reads
    exactly what the demuxer asks for, with no read-ahead beyond one block.
    ``bytes_fetched`` counts what came from the store."""

    def __init__(self, fs: Any, path: str, size: int, block_bytes: int = 256 << 10,
                 fetch: Callable[[int, int], bytes] | None = None):
        self.fs, self.path, self.size, self.block_bytes = fs, path, int(size), block_bytes
        self.fetch = fetch or self._from_fs
        self.pos = 0
        self.bytes_fetched = 0
        self._block_start, self._block = -1, b""

    def _from_fs(self, start: int, end: int) -> bytes:
        from .retry import retry

        return retry(lambda: self.fs.cat_file(self.path, start=start, end=end),
                     "reading a video's header")

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
            self._block = self.fetch(start, min(self.size, start + self.block_bytes))
            self._block_start = start
            self.bytes_fetched += len(self._block)
        data = self._block[self.pos - start:self.pos - start + len(buffer)]
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def http_ranges(url: str) -> Callable[[int, int], bytes]:
    """``fetch(start, end)`` for :class:`RangeFile`: one ``Range`` request to ``url`` (the
    loopback proxy) per block."""
    import urllib.request

    def fetch(start: int, end: int) -> bytes:
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    return fetch


def header_probe(fs: Any, uri: str, size_bytes: int | None = None,
                 stats: dict[str, int] | None = None) -> dict[str, Any] | None:
    """``frames_total``, ``fps``, ``width``, ``height`` and ``duration_s`` from the
    header of an MP4/MOV file, or None where the header cannot stand in for a full probe.
    ``stats``, when given, receives ``bytes_fetched`` (object stores). In this process: a
    job probes in a decoder child (``operators.decode.probe``)."""
    if not uri.lower().endswith(_EXTENSIONS):
        return None
    from fsspec.implementations.local import LocalFileSystem

    source: Any = None
    try:
        if isinstance(fs, LocalFileSystem):
            target: Any = uri[len("file://"):] if uri.startswith("file://") else uri
            size = size_bytes if size_bytes is not None else fs.info(target)["size"]
        else:
            path = uri.split("://", 1)[-1]
            size = size_bytes if size_bytes is not None else int(fs.info(path)["size"])
            source = target = RangeFile(fs, path, size)
        return header_probe_source(target, int(size))
    except Exception:  # unreadable here: the full probe says why, in its own words
        return None
    finally:
        if source is not None and stats is not None:
            stats["bytes_fetched"] = stats.get("bytes_fetched", 0) + source.bytes_fetched


def header_probe_source(source: Any, size: int) -> dict[str, Any] | None:
    """:func:`header_probe` of a local path or a :class:`RangeFile` of ``size`` bytes
    (raises on unreadable input; the caller falls back)."""
    import av

    from .decode import mp4_problem

    if isinstance(source, str):
        with open(source, "rb") as f:
            def read(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            problem = mp4_problem(read, size, tracks=False)
    else:
        def read(start: int, end: int) -> bytes:  # box headers: exact small reads
            data = source.fetch(start, end)
            source.bytes_fetched += len(data)
            return data

        problem = mp4_problem(read, size, tracks=False)
    if problem:  # a truncated or broken file: the full probe counts what it holds
        return None
    with av.open(source, "r", options={"format_whitelist": "mov"}) as container:
        if container.format.name != _ISO_BMFF or not container.streams.video:
            return None
        stream = container.streams.video[0]
        frames = int(stream.frames or 0)
        fps = float(stream.average_rate or 0)
        if frames > size:  # every frame takes at least a byte: the header lies
            return None
        # The first frame (one key frame's worth of data) says how the video is turned:
        # frames are handed out turned upright, so a quarter turn swaps the sides.
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
                "duration_s": duration_s, "probe_warning": None}
