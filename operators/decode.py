"""Decoding videos with decord, frames in order, memory bounded by the decoder's buffers.

Local files are opened by path. Anything else (S3 and other fsspec stores) is streamed
through the process's loopback range proxy (``operators/proxy.py``): decord reads it with
HTTP range requests, so a video is never downloaded whole nor held in memory.

Which frames a job looks at is decided on the *global* frame index of the video, so that a
video split into segments samples exactly the frames it would have sampled whole.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import decord
    decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own chatter on broken streams
except ImportError:  # pragma: no cover - decord is a hard dependency; import errors surface later
    decord = None


def sampling_ratio(native_fps: float, fps: float | None, stride: int = 1) -> float:
    """Fraction of frames kept: ``fps`` subsamples to that rate (never above the native
    rate), then every ``stride``-th of those frames is kept."""
    ratio = 1.0
    if fps and native_fps and fps < native_fps:
        ratio = fps / native_fps
    return ratio / max(1, int(stride))


def sampled_indices(start: int, end: int, ratio: float) -> list[int]:
    """The global frame indices in ``[start, end)`` that a job with this ``ratio`` looks at.

    Frame ``i`` is kept when ``floor(i * ratio)`` steps up at ``i``: frame 0 always, then
    the first frame of every later sampling period (every k-th frame when ratio = 1/k)."""
    if ratio >= 1.0:
        return list(range(start, end))
    eps = 1e-9
    return [i for i in range(start, end)
            if math.floor(i * ratio + eps) != math.floor((i - 1) * ratio + eps)]


_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ")


def clean_error(exc: BaseException, url: str | None = None, uri: str | None = None) -> str:
    """A short, readable message: decord's C++ log prefixes dropped, the loopback URL
    replaced by the object's own URI."""
    text = str(exc) or type(exc).__name__
    text = _LOG_PREFIX.sub("", text)
    text = " ".join(text.split())
    if url and uri:
        text = text.replace(url, uri)
    text = re.sub(r"http://127\.0\.0\.1:\d+/[A-Za-z0-9_-]+/video(\.\w+)?", uri or "<video>",
                  text)
    name = type(exc).__name__
    if not text.startswith(name):
        text = f"{name}: {text}"
    return text[:500]


class VideoSource:
    """An open decord reader on a local path or a proxied object; close it when done."""

    def __init__(self, fs: Any, uri: str, size_bytes: int | None = None):
        from fsspec.implementations.local import LocalFileSystem

        self.uri = uri
        self.url: str | None = None
        if isinstance(fs, LocalFileSystem):
            target = uri[len("file://"):] if uri.startswith("file://") else uri
        else:
            from .proxy import shared_proxy

            self.url = target = shared_proxy().register(fs, uri, size_bytes)
        try:
            # One decoding thread: several streams decode side by side in one actor and
            # Ray already runs several actors per node.
            self.reader = decord.VideoReader(target, num_threads=1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.reader = None
        if self.url:
            from .proxy import shared_proxy

            shared_proxy().unregister(self.url)
            self.url = None

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe(fs: Any, uri: str, size_bytes: int | None = None) -> dict[str, Any]:
    """Frames, frame rate, duration and frame size of a video, as decord sees it."""
    with VideoSource(fs, uri, size_bytes) as src:
        vr = src.reader
        frames = len(vr)
        if frames <= 0:
            raise ValueError("no video frames")
        fps = float(vr.get_avg_fps() or 0.0)
        height, width = vr[0].shape[:2]
        try:
            duration_s = float(vr.get_frame_timestamp([frames - 1])[0, 1])
        except Exception:
            duration_s = 0.0
        if not duration_s > 0 and fps > 0:
            duration_s = frames / fps
        return {"frames_total": int(frames), "fps": fps, "width": int(width),
                "height": int(height), "duration_s": duration_s}


@dataclass
class Frame:
    index: int          # global frame index in the video
    timestamp_s: float  # presentation time of the frame
    rgb: np.ndarray     # (H, W, 3) uint8


@dataclass
class SegmentDecoder:
    """The sampled frames ``indices`` (sorted, within one segment) of one video, in order.

    :meth:`read` returns the next frame, or None when the segment is done or the decoder
    failed; then ``error`` says why (a clean end leaves it None). Frames decoded before an
    error are kept by the caller: the segment is *partial*.

    decord decodes ahead in a worker thread, in real time: when the caller is slow (a model
    runs between frames) the worker reaches a damaged packet early, and the error it raises
    discards frames that had decoded fine. So after an error the decoder reopens the video,
    seeks to the first missing frame and decodes eagerly into a buffer (at most
    ``recover_bytes``) until the error comes back; the frames before the damage are kept
    whatever the caller's pace. A recovery that yields no frame ends the segment.
    """

    fs: Any
    uri: str
    indices: list[int]
    size_bytes: int | None = None
    max_reopens: int = 16
    recover_bytes: int = 256 << 20
    error: str | None = None
    frames_decoded: int = 0
    decode_s: float = 0.0
    _source: VideoSource | None = field(default=None, repr=False)
    _pos: int = field(default=-1, repr=False)     # index of the next frame the reader yields
    _next: int = field(default=0, repr=False)     # position in ``indices`` of the next frame
    _buffer: deque = field(default_factory=deque, repr=False)
    _pts: np.ndarray | None = field(default=None, repr=False)
    _fps: float = field(default=0.0, repr=False)
    _reopens: int = field(default=0, repr=False)

    def read(self) -> Frame | None:
        t0 = time.perf_counter()
        try:
            frame = self._read()
        finally:
            self.decode_s += time.perf_counter() - t0
        if frame is None:
            self.close()
            return None
        self._next += 1
        self.frames_decoded += 1
        return frame

    def _read(self) -> Frame | None:
        if self._buffer:
            return self._buffer.popleft()
        if self.error is not None or self._next >= len(self.indices):
            return None
        try:
            if self._source is None:
                self._open()
            return self._frame(self._next)
        except StopIteration:
            total = len(self._source.reader) if self._source else "?"
            self.error = (f"the stream ended at frame {self.indices[self._next]}; the "
                          f"container says it has {total} frames")
            return None
        except Exception as exc:  # a broken stream (or store)
            message = self._message(exc)
        if self._reopens < self.max_reopens:
            message = self._recover() or message
            if self._buffer:
                return self._buffer.popleft()
        self.error = f"decoding failed at frame {self.indices[self._next]}: {message}"
        return None

    def _recover(self) -> str | None:
        """Reopen, then decode eagerly from the first missing frame; returns the error that
        stopped it, if any."""
        self.close()
        self._reopens += 1
        budget = self.recover_bytes
        position = self._next
        try:
            self._open()
            while position < len(self.indices) and budget > 0:
                frame = self._frame(position)
                self._buffer.append(frame)
                budget -= frame.rgb.nbytes
                position += 1
        except StopIteration:
            return None  # the next read reports the early end
        except Exception as exc:
            message = self._message(exc)
            self.close()
            return message
        return None

    def _frame(self, position: int) -> Frame:
        target = self.indices[position]
        vr = self._source.reader
        if target >= len(vr):
            raise EOFError(f"the video has {len(vr)} frames; frame {target} is missing")
        if self._pos < 0 or target < self._pos:
            if target > 0:
                vr.seek_accurate(target)
            self._pos = target
        elif target > self._pos:
            vr.skip_frames(target - self._pos)  # decode without colour conversion
            self._pos = target
        rgb = vr.next().asnumpy()
        self._pos += 1
        if self._pts is not None:
            ts = float(self._pts[position])
        else:
            ts = target / self._fps if self._fps else 0.0
        return Frame(target, ts, rgb)

    def _open(self) -> None:
        self._source = VideoSource(self.fs, self.uri, self.size_bytes)
        vr = self._source.reader
        self._fps = float(vr.get_avg_fps() or 0.0)
        try:
            self._pts = vr.get_frame_timestamp(self.indices)[:, 0]
        except Exception:
            self._pts = None

    def _message(self, exc: BaseException) -> str:
        return clean_error(exc, self._source.url if self._source else None, self.uri)

    @property
    def done(self) -> bool:
        return not self._buffer and (self.error is not None or self._next >= len(self.indices))

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        self._pos = -1  # a reopened reader starts from the beginning
