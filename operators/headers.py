"""Probing a video from its container header alone, where the header can be trusted.

decord opens a video by reading every packet of it (to index key frames), so a decord probe
costs a full read of the file: on an object store, the whole archive once more before any
work starts. MP4 and QuickTime files (and their 3GP/M4V cousins) list every sample of a
track in their header (``stsz``), and FFmpeg's demuxer returns one packet per sample, so the
frame count decord would find is in the header; PyAV reads it (and the frame rate, frame
size and duration) without touching the media data.

Only for that container family, and only when the header gives a frame count, a frame rate
and a frame size; anything else returns None and the caller falls back to decord. Through
an object store this reads what the demuxer asks for through a proxy with small chunks:
the start of the file and the ``moov`` box (at the end of files written without
``faststart``), tens of kilobytes for short clips, a few megabytes for hours-long ones.
"""

from __future__ import annotations

import threading
from typing import Any

#: FFmpeg's name for the ISO base media file format demuxer.
_ISO_BMFF = "mov,mp4,m4a,3gp,3g2,mj2"
_EXTENSIONS = (".mp4", ".m4v", ".mov", ".3gp", ".3g2")
_PROXY = None
_PROXY_LOCK = threading.Lock()


def _header_proxy():
    """A proxy of its own, with small uncached chunks: a header probe reads a little here
    and a little there, and a 4 MiB read-ahead per seek would dwarf what it needs."""
    global _PROXY
    with _PROXY_LOCK:
        if _PROXY is None:
            from .proxy import RangeProxy

            _PROXY = RangeProxy(chunk_bytes=256 << 10)
        return _PROXY


def header_probe(fs: Any, uri: str, size_bytes: int | None = None) -> dict[str, Any] | None:
    """``frames_total``, ``fps``, ``width``, ``height`` and ``duration_s`` from the
    header of an MP4/MOV file, or None where the header cannot stand in for decord."""
    if not uri.lower().endswith(_EXTENSIONS):
        return None
    try:
        import av
    except ImportError:  # pragma: no cover - PyAV comes with the dependencies
        return None
    from fsspec.implementations.local import LocalFileSystem

    url = None
    if isinstance(fs, LocalFileSystem):
        target = uri[len("file://"):] if uri.startswith("file://") else uri
    else:
        url = target = _header_proxy().register(fs, uri, size_bytes)
    try:
        with av.open(target, timeout=30) as container:
            if container.format.name != _ISO_BMFF or not container.streams.video:
                return None
            stream = container.streams.video[0]
            frames = int(stream.frames or 0)
            fps = float(stream.average_rate or 0)
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            if frames <= 0 or fps <= 0 or width <= 0 or height <= 0:
                return None
            duration_s = (float(stream.duration * stream.time_base)
                          if stream.duration and stream.time_base else frames / fps)
            return {"frames_total": frames, "fps": fps, "width": width, "height": height,
                    "duration_s": duration_s}
    except Exception:  # unreadable here: decord's probe says why, in its own words
        return None
    finally:
        if url:
            _header_proxy().unregister(url)
