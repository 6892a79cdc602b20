"""Decoding videos frame by frame with FFmpeg (PyAV), in a child process, memory bounded.

- :func:`probe` and :class:`SegmentDecoder` are what the driver and the actors call; they
  hand the work to a decoder child (``operators/isolation.py``), copy frames out of its
  shared-memory ring, and restart it from the first missing frame when it crashes or makes
  no progress for ``timeout_s`` (at most ``retries`` times; then the segment ends with the
  error). A file that makes FFmpeg crash or hang costs a child, never the actor or driver.
- :func:`probe_target` and :class:`AVSegment` run inside the child. Decoding is *pulled*,
  one frame at a time: decord, used before, decodes ahead in a thread of its own without
  limit when its caller is slower than it (a model always is) and held ~240 1080p frames
  (1.4 GB) per stream in measurements (docs/MEMORY.md); it also mangled frames narrower
  than 32 pixels. Frame numbers are what decord counted: the video stream's packets in
  presentation order.
- :class:`DecordSegment` does :class:`AVSegment`'s work with decord instead
  (``decode.backend: decord``; :func:`open_segment` picks one): the same frame numbers,
  timestamps and errors, decoded in batches whose size bounds the child's memory.
- :func:`diagnose` says what a file that cannot be decoded actually is (gone, empty, an
  image, text, a truncated MP4, an audio-only file, an unknown codec).

FFmpeg may open only the file itself or the loopback proxy (a protocol whitelist) and only
video containers (a demuxer whitelist): a playlist or concat list disguised as a video
cannot make it read other files or URLs.

Local files are opened by path. Anything else (S3 and other fsspec stores) is streamed
through the process's loopback range proxy (``operators/proxy.py``): FFmpeg reads it with
HTTP range requests, so a video is never downloaded whole nor held in memory.

Which frames a job looks at is decided on the *global* frame index of the video, so that a
video split into segments samples exactly the frames it would have sampled whole.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .redact import redact

#: A decoder child that makes no progress (no frame, no byte read) for this long is killed.
DEFAULT_TIMEOUT_S = 120.0
#: Fresh children a segment may use after its decoder crashed or hung.
DEFAULT_RETRIES = 2


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


# -- messages -----------------------------------------------------------------------------------

class VideoError(Exception):
    """A video that cannot be read; the message is ready for the ``error`` column."""


_LOOPBACK = re.compile(r"http://127\.0\.0\.1:\d+/[A-Za-z0-9_-]+/video(\.\w+)?")


def clean_error(exc: BaseException, url: str | None = None, uri: str | None = None) -> str:
    """A short, readable message (the exception's type first, unless it is a
    :class:`VideoError`), the loopback URL replaced by the object's own URI, secrets
    redacted."""
    text = exc_message(exc)
    if not isinstance(exc, VideoError):
        name = type(exc).__name__
        if not text.startswith(name):
            text = f"{name}: {text}"
    return public_text(text, url, uri)


def public_text(text: str, url: str | None = None, uri: str | None = None) -> str:
    """``text`` fit for outputs: one line, the loopback URL replaced by ``uri``, secrets
    redacted, at most 500 characters."""
    text = " ".join(text.split())
    if url and uri:
        text = text.replace(url, uri)
    text = _LOOPBACK.sub(lambda m: uri or "<video>", text)
    return redact(text)[:500]


def storage_failure(exc: BaseException) -> str:
    """A read from the store failed: what it means for a video listed earlier."""
    detail = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError):
        return "the file is gone (not found): it was deleted or moved after the job listed it"
    if isinstance(exc, PermissionError):
        return f"access denied (403) reading it: {detail}" if detail else "access denied (403)"
    return f"reading it failed: {type(exc).__name__}: {detail}"


# -- what the file is, when it cannot be decoded ----------------------------------------------

_MAGIC = [(b"\x89PNG\r\n\x1a\n", "an image (PNG)"), (b"\xff\xd8\xff", "an image (JPEG)"),
          (b"GIF8", "an image (GIF)"), (b"BM", None), (b"%PDF", "a PDF document"),
          (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip archive"),
          (b"7z\xbc\xaf", "a 7-Zip archive"), (b"ID3", "audio (MP3)"),
          (b"fLaC", "audio (FLAC)"), (b"OggS", None)]
_ISO_CONTAINERS = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
#: MP4 sample-entry codes of video codecs FFmpeg decodes (others are named in diagnoses).
_KNOWN_CODECS = {"avc1", "avc2", "avc3", "avc4", "hvc1", "hev1", "mp4v", "vp08", "vp09",
                 "av01", "mjpa", "mjpb", "jpeg", "apch", "apcn", "apcs", "apco", "ap4h",
                 "ap4x", "s263", "h263", "dvh1", "dvhe", "raw", "2vuy", "yuv2", "dvc",
                 "dvcp", "dv5n", "dv5p", "dvhp", "mpg2", "xvid", "divx", "vc-1", "cvid"}
_HANDLERS = {b"vide": "video", b"soun": "audio", b"text": "text", b"sbtl": "subtitles",
             b"subt": "subtitles", b"meta": "metadata", b"tmcd": "timecode", b"hint": "hint"}


def diagnose(fs: Any, uri: str, listed_size: int | None = None) -> str | None:
    """What ``uri`` is, when it could not be decoded: gone, unreadable, a folder, empty, an
    image or text with a video extension, a truncated or index-less MP4, an MP4 without a
    video track or with a codec the decoder does not know. None when nothing stands out."""
    path = _fs_path(fs, uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return "the file is gone (not found): it was deleted or moved after the job listed it"
    except PermissionError as exc:
        return storage_failure(exc)
    except OSError as exc:
        return storage_failure(exc)
    if info.get("type") == "directory":
        return "a folder, not a video file"
    size = int(info.get("size") or 0)
    if size == 0:
        return "an empty file (0 bytes)"
    changed = (f"; it changed since the job listed it ({listed_size:,d} bytes then, "
               f"{size:,d} now)" if listed_size is not None and listed_size != size else "")
    try:
        head = fs.cat_file(path, start=0, end=min(size, 4096))
    except OSError as exc:
        return storage_failure(exc)
    kind = _sniff(head)
    if kind:
        return f"not a video: {kind}{changed}"
    if len(head) >= 8 and head[4:8] in _ISO_CONTAINERS:
        problem = mp4_problem(lambda start, end: fs.cat_file(path, start=start, end=end), size)
        if problem:
            return problem + changed
    return changed[2:] or None


def _sniff(head: bytes) -> str | None:
    for magic, kind in _MAGIC:
        if kind and head.startswith(magic):
            return kind
    if head[8:12] == b"WEBP" and head.startswith(b"RIFF"):
        return "an image (WebP)"
    if head[8:12] == b"WAVE" and head.startswith(b"RIFF"):
        return "audio (WAV)"
    sample = head[:1024]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(c.isprintable() or c in "\r\n\t" for c in text)
    return "a text file" if text and printable >= 0.95 * len(text) else None


def _boxes(data: bytes, start: int, end: int):
    """(type, payload start, box end) of the ISO-BMFF boxes in ``data[start:end]``."""
    i = start
    while i + 8 <= end:
        size = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        header = 8
        if size == 1 and i + 16 <= end:
            size, header = int.from_bytes(data[i + 8:i + 16], "big"), 16
        elif size == 0:
            size = end - i
        if size < header:
            return
        yield kind, i + header, i + size
        i += size


def mp4_problem(read: Callable[[int, int], bytes], size: int, tracks: bool = True
                ) -> str | None:
    """What is wrong with an MP4/MOV of ``size`` bytes, read with ``read(start, end)``:
    its top-level boxes walked (a few small reads), then (``tracks``) its ``moov``'s
    tracks. None: nothing."""
    offset, moov, seen = 0, None, 0
    while offset + 8 <= size and seen < 10_000:
        seen += 1
        header = read(offset, min(size, offset + 16))
        box_size = int.from_bytes(header[:4], "big")
        kind = header[4:8]
        if box_size == 1 and len(header) >= 16:
            box_size = int.from_bytes(header[8:16], "big")
        elif box_size == 0:
            box_size = size - offset
        if box_size < 8:
            return f"a damaged MP4: box '{_fourcc(kind)}' at byte {offset:,d} has size {box_size}"
        if offset + box_size > size:
            return (f"a truncated file: it ends at byte {size:,d}, inside its "
                    f"'{_fourcc(kind)}' box, which needs {offset + box_size:,d} bytes (an "
                    f"upload or copy cut short)")
        if kind == b"moov":
            moov = (offset, box_size)
        offset += box_size
    if moov is None:
        return ("a truncated or unfinished MP4: it has no 'moov' box, the index a player needs "
                "(it is written last, so a recording that was not stopped cleanly or a file "
                "cut short lacks it)")
    if not tracks or moov[1] > 64 << 20:
        return None
    data = read(moov[0], moov[0] + moov[1])
    tracks = []
    for kind, start, end in _boxes(data, 8, len(data)):
        if kind == b"trak":
            tracks.append(_track(data, start, end))
    video = [codec for handler, codec in tracks if handler == b"vide"]
    if not video:
        kinds = sorted({f"{_HANDLERS.get(h, _fourcc(h))} ({c})" if c else
                        _HANDLERS.get(h, _fourcc(h)) for h, c in tracks})
        return "no video track" + (f": only {', '.join(kinds)}" if kinds else "")
    if video[0] and video[0].strip() not in _KNOWN_CODECS:
        return f"its video track uses codec '{video[0]}', which the decoder does not know"
    return None


def _track(data: bytes, start: int, end: int) -> tuple[bytes, str | None]:
    """(handler type, first sample-description fourcc) of a ``trak`` box."""
    handler, codec = b"", None
    stack = [(b"trak", start, end)]
    while stack:
        parent, s, e = stack.pop()
        for kind, ps, pe in _boxes(data, s, e):
            if kind in (b"mdia", b"minf", b"stbl"):
                stack.append((kind, ps, pe))
            elif kind == b"hdlr" and parent == b"mdia" and pe - ps >= 12:
                # the media handler; QuickTime's minf holds a data handler ('url ') too
                handler = data[ps + 8:ps + 12]
            elif kind == b"stsd" and pe - ps >= 16:
                codec = _fourcc(data[ps + 12:ps + 16])
    return handler, codec


def _fourcc(raw: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "?" for b in raw)


# -- inside the child: FFmpeg through PyAV ---------------------------------------------------

#: Containers a video may come in (FFmpeg demuxer names). Anything else is refused before a
#: frame is read: image "demuxers" (a PNG named .mp4), playlists and concat lists that would
#: make FFmpeg open other files or URLs named inside a hostile file (HLS, DASH, ffconcat).
CONTAINERS = ("mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg", "mpegvideo", "flv",
              "asf", "mxf", "ogg", "nut", "ivf", "gif", "dv", "h264", "hevc", "m4v", "rm",
              "wtv", "yuv4mpegpipe", "obu", "av1")
#: What the decoder may open: the file itself, or the loopback proxy over plain HTTP.
_PROTOCOLS = {"file": "file", "http": "http,tcp"}
_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "gif_pipe", "webp_pipe", "bmp_pipe")


def exc_message(exc: BaseException) -> str:
    """An exception as one readable line: PyAV's ``[Errno N]`` and the path or URL it names
    dropped, FFmpeg's last log line as ``(FFmpeg: h264: ...)``."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)
    text, _, log = text.partition("; last error log: ")
    text = re.sub(r": '[^']*'$", "", text)
    if log:
        m = re.match(r"^\[([\w,]+)\] (.*)$", log)
        log = f"{m.group(1).split(',')[0]}: {m.group(2)}" if m else log
        text = f"{text} (FFmpeg: {log.rstrip('.')})"
    return text


def _open(target: str):
    """The container and its first video stream, with FFmpeg confined to ``target``."""
    import av

    scheme = "http" if target.startswith("http://") else "file"
    try:
        container = av.open(target, options={"protocol_whitelist": _PROTOCOLS[scheme],
                                             "format_whitelist": ",".join(CONTAINERS)})
    except av.error.ArgumentError as exc:
        found = re.search(r"FFmpeg: (\w+): Format not on whitelist", exc_message(exc))
        raise VideoError("not a container videos come in" + (
            f" (FFmpeg recognised '{found.group(1)}')" if found else "")) from None
    except av.error.FFmpegError as exc:
        raise VideoError(f"cannot open it: {exc_message(exc)}") from None
    try:
        streams = container.streams.video
        if not streams:
            kinds = sorted({s.type for s in container.streams})
            raise VideoError("no video stream" + (f": only {', '.join(kinds)}" if kinds else ""))
        stream = streams[0]
        if stream.codec_context is None or not stream.codec_context.name:
            raise VideoError("its video stream uses a codec the decoder does not know")
        stream.codec_context.thread_count = 1  # several streams and actors share the CPUs
        return container, stream
    except BaseException:
        container.close()
        raise


@dataclass
class MediaIndex:
    """What decoding by frame number needs: every video packet's presentation time, sorted
    (frame ``i`` is the ``i``-th), and which frames are keyframes. Built by reading every
    packet once, without decoding (decord did the same when it opened a file)."""

    pts: list[int]
    keyframes: list[int]        # frame numbers, sorted
    durations: list[int]
    start: int
    time_base: float
    fps: float

    @classmethod
    def build(cls, container: Any, stream: Any) -> "MediaIndex":
        import av

        entries = []
        try:
            for packet in container.demux(stream):
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None or packet.size == 0:
                    continue
                entries.append((pts, bool(packet.is_keyframe), int(packet.duration or 0)))
        except av.error.FFmpegError as exc:
            raise VideoError(f"the container is damaged after {len(entries)} frames "
                             f"({exc_message(exc)})") from None
        entries.sort()
        start = stream.start_time if stream.start_time is not None else (
            entries[0][0] if entries else 0)
        rate = stream.average_rate or stream.guessed_rate
        return cls([e[0] for e in entries], [i for i, e in enumerate(entries) if e[1]],
                   [e[2] for e in entries], int(start), float(stream.time_base or 0),
                   float(rate) if rate else 0.0)

    def __len__(self) -> int:
        return len(self.pts)

    def timestamp_s(self, i: int) -> float:
        return (self.pts[i] - self.start) * self.time_base

    def keyframe_before(self, i: int) -> int:
        k = bisect.bisect_right(self.keyframes, i) - 1
        return self.keyframes[k] if k >= 0 else 0


def _rgb(frame: Any) -> np.ndarray:
    """A decoded frame as (H, W, 3) RGB, turned as its display matrix says (a phone video
    recorded upright comes out upright)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = int(round(float(getattr(frame, "rotation", 0) or 0) / 90)) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def probe_target(target: str, size_bytes: int | None = None) -> dict[str, Any]:
    """Frames, frame rate, duration and frame size (as displayed) of a local path or URL
    (runs in the decoder child): from an MP4/MOV header when it can be trusted
    (``operators/headers.py``, a few reads), else by reading every packet."""
    header = _header_probe(target, size_bytes)
    if header is not None:
        return header
    return _full_probe(target)


def _header_probe(target: str, size_bytes: int | None) -> dict[str, Any] | None:
    from .headers import _EXTENSIONS, RangeFile, header_probe_source, http_ranges

    if not target.lower().endswith(_EXTENSIONS):
        return None
    try:
        if target.startswith("http://"):
            if size_bytes is None:
                return None
            return header_probe_source(RangeFile(None, target, size_bytes,
                                                 fetch=http_ranges(target)), size_bytes)
        return header_probe_source(target, os.path.getsize(target))
    except Exception:  # the full probe says why, in its own words
        return None


def _full_probe(target: str) -> dict[str, Any]:
    import av

    container, stream = _open(target)
    try:
        if container.format.name in _IMAGE_FORMATS:
            raise VideoError("not a video: an image")
        index = MediaIndex.build(container, stream)
        if not len(index):
            raise VideoError("no video frames")
        container.seek(index.pts[0], stream=stream, backward=True)
        try:
            first = next(iter(container.decode(stream)))
        except StopIteration:
            raise VideoError("no frame could be decoded") from None
        except av.error.FFmpegError as exc:
            raise VideoError(f"its first frame cannot be decoded ({exc_message(exc)})"
                             ) from None
        height, width = _rgb(first).shape[:2]
        last = len(index) - 1
        duration_s = index.timestamp_s(last) + index.durations[last] * index.time_base
        if not duration_s > 0 and index.fps > 0:
            duration_s = len(index) / index.fps
        # The header's own count is only compared, never trusted (it may claim billions).
        declared = int(stream.frames or 0)
        warning = (f"incomplete: the container lists {declared:,d} frames, the file holds "
                   f"{len(index):,d} (a truncated file, or a header that does not match its "
                   "data)" if declared > len(index) else None)
        return {"frames_total": len(index), "fps": index.fps, "width": int(width),
                "height": int(height), "duration_s": float(duration_s),
                "probe_warning": warning}
    finally:
        container.close()


@dataclass
class Frame:
    index: int          # global frame index in the video
    timestamp_s: float  # presentation time of the frame
    rgb: np.ndarray     # (H, W, 3) uint8


def _read_next(segment: Any, message: Callable[[BaseException], str]) -> Frame | None:
    """A segment's next frame (``segment._read``), or None when it is done or broke; then
    ``segment.error`` says at which frame, in the decoder's words (``message``)."""
    if segment.error is not None or segment._next >= len(segment.indices):
        segment.close()
        return None
    target = segment.indices[segment._next]
    try:
        frame = segment._read(target)
    except VideoError as exc:
        segment.error = f"decoding failed at frame {target}: {exc}"
    except Exception as exc:  # the decoder's own errors on a broken stream
        segment.error = f"decoding failed at frame {target}: {message(exc)}"
    else:
        segment._next += 1
        return frame
    segment.close()
    return None


@dataclass
class AVSegment:
    """The sampled frames ``indices`` (sorted, within one segment) of ``target`` (a local
    path or a URL), in order, decoded in this process (the decoder child).

    Decoding is pulled frame by frame: nothing is decoded ahead of the caller, so memory
    holds the codec's own reference frames and one output frame, whatever the video's
    length or the caller's pace. Frames between two sampled ones are decoded (a P-frame
    needs its predecessors) but not converted to RGB; a gap that crosses a keyframe seeks
    to it. :meth:`read` returns the next frame, or None when the segment is done or the
    stream broke; then ``error`` says why (a clean end leaves it None), and the frames
    before the damage stand.
    """

    target: str
    indices: list[int]
    error: str | None = None
    _container: Any = field(default=None, repr=False)
    _stream: Any = field(default=None, repr=False)
    _index: MediaIndex | None = field(default=None, repr=False)
    _lookup: dict[int, int] = field(default_factory=dict, repr=False)
    _frames: Any = field(default=None, repr=False)   # decoded frames from the last seek
    _at: int = field(default=-1, repr=False)         # frame number of the last decoded frame
    _landing: int = field(default=0, repr=False)     # the keyframe the last seek aimed at
    _next: int = field(default=0, repr=False)        # position in ``indices``

    def read(self) -> Frame | None:
        return _read_next(self, exc_message)  # FFmpeg's errors on a broken stream

    def _read(self, target: int) -> Frame:
        if self._container is None:
            self._container, self._stream = _open(self.target)
            self._index = MediaIndex.build(self._container, self._stream)
            self._lookup = {pts: i for i, pts in enumerate(self._index.pts)}
        index = self._index
        if target >= len(index):
            raise VideoError(f"the stream ended at frame {len(index)}; frame {target} is "
                             "missing")
        key = index.keyframe_before(target)
        if self._frames is None or target <= self._at or key > self._at:
            self._seek(key)
        for _ in range(2):
            for frame in self._frames:
                # Frames are numbered in the order the decoder gives them, from the frame a
                # seek lands on (found by its timestamp), as decord numbered them: packed
                # B-frames (MPEG-4 in AVI) come out with timestamps out of order.
                if self._at < 0:
                    pts = frame.pts if frame.pts is not None else frame.dts
                    self._at = self._lookup.get(pts, self._landing)
                else:
                    self._at += 1
                if self._at < target:
                    continue
                if self._at > target:  # landed past it: the seek missed its keyframe
                    break
                return Frame(target, index.timestamp_s(target), _rgb(frame))
            else:
                raise VideoError(f"the stream ended before frame {target} (the container "
                                 f"lists {len(index)} frames)")
            self._seek(0)  # decode from the very start: slower, never misses
        raise VideoError("the decoder skipped this frame")

    def _seek(self, key: int) -> None:
        self._container.seek(self._index.pts[key], stream=self._stream, backward=True,
                             any_frame=False)
        self._frames = iter(self._container.decode(self._stream))
        self._at, self._landing = -1, key

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._stream = self._frames = None


# -- inside the child: decord ------------------------------------------------------------------

#: Choices of ``decode.backend``: what decodes frames in the child.
BACKENDS = ("pyav", "decord")
#: What one ``get_batch`` may ask of decord: its frames are held in the child until read.
DECORD_BATCH_BYTES = 256 << 20
DECORD_BATCH_FRAMES = 256
#: decord returns garbled pixels for frames narrower or lower than this.
DECORD_MIN_SIDE = 32


def decord_message(exc: BaseException) -> str:
    """decord's error as one readable line, ``decord: ...``: its ``[time] file.cc:line:``
    prefixes and the C++ check dropped, an FFmpeg error code named (``decord: Error sending
    packet (Invalid data found when processing input)``)."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+\.(cc|h|cpp):\d+: ", "", text)
    check = re.search(r"Check failed: .*? \((-?\d+) vs\. -?\d+\) ?(.*)$", text)
    if check:
        what = re.sub(r"^Thread worker: ", "", check.group(2)).rstrip(".") or "check failed"
        text = f"{what} ({_ffmpeg_error(int(check.group(1)))})"
    return f"decord: {text}"


def _ffmpeg_error(code: int) -> str:
    import av.error

    try:
        av.error.err_check(code)
    except av.error.FFmpegError as err:
        return exc_message(err)
    except Exception:  # not an FFmpeg error code
        pass
    return f"code {code}"


@dataclass
class DecordSegment:
    """:class:`AVSegment`'s work done by decord (``decode.backend: decord``), in the decoder
    child: the same frames, numbers, timestamps and errors.

    The video is opened by PyAV first (with its protocol and container whitelists: decord
    takes no such options) to build the :class:`MediaIndex` that numbers frames and gives
    their timestamps (decord's are wrong for AVI); decord then decodes the pixels, many
    sampled frames per ``get_batch``.

    decord decodes ahead of its caller in a thread of its own, without limit (docs/MEMORY.md).
    A seek stops it, so every batch is followed by one; the next batch then decodes again
    from the keyframe before its first frame. So batches end before a keyframe where they
    can (the next one starts there, at no cost), and hold at most :data:`DECORD_BATCH_BYTES`
    of frames: memory is bounded by that, not by the video. Frames a keyframe interval
    longer than a batch puts in the middle of it are decoded more than once.

    An error in decord's thread surfaces on the next call, even when the frames asked for
    precede the damage; so after an error the first frame is asked of a fresh reader alone.
    Even alone it can be lost to the thread running into damage just after it, depending on
    timing, so a frame a fresh reader fails on is confirmed with PyAV (:meth:`_confirmed`),
    and only a frame both fail on ends the segment.
    """

    target: str
    indices: list[int]
    error: str | None = None
    _reader: Any = field(default=None, repr=False)
    _fresh: bool = field(default=False, repr=False)  # nothing asked of this reader yet
    _index: MediaIndex | None = field(default=None, repr=False)
    _frames: int = field(default=0, repr=False)      # frames both decord and the index know
    _batch_frames: int = field(default=1, repr=False)
    _ready: list[Frame] = field(default_factory=list, repr=False)  # decoded, not yet read
    _next: int = field(default=0, repr=False)
    _pyav: AVSegment | None = field(default=None, repr=False)  # confirms lost frames

    def read(self) -> Frame | None:
        return _read_next(self, decord_message)  # decord's errors (DECORDError)

    def _read(self, target: int) -> Frame:
        if self._index is None:
            self._open()
        if not self._ready:
            if target >= self._frames:
                raise VideoError(f"the stream ended at frame {self._frames}; frame {target} "
                                 "is missing")
            chunk = self._chunk()
            rgb = self._batch(chunk)
            self._ready = [Frame(i, self._index.timestamp_s(i), rgb[k])
                           for k, i in enumerate(chunk[:len(rgb)])][::-1]
        frame = self._ready.pop()
        if not self._ready:  # a view would keep the whole batch alive through the next one
            frame.rgb = frame.rgb.copy()
        return frame

    def _chunk(self) -> list[int]:
        """The next batch: up to ``_batch_frames`` sampled frames, ending before the first
        keyframe after its first frame (unless that would leave it one frame long)."""
        chunk = [i for i in self.indices[self._next:self._next + self._batch_frames]
                 if i < self._frames]
        k = bisect.bisect_right(self._index.keyframes, chunk[0])
        if k < len(self._index.keyframes):
            cut = bisect.bisect_left(chunk, self._index.keyframes[k])
            if cut > 1:
                chunk = chunk[:cut]
        return chunk

    def _open(self) -> None:
        container, stream = _open(self.target)
        try:
            width, height = stream.codec_context.width, stream.codec_context.height
            if width and height and min(width, height) < DECORD_MIN_SIDE:
                raise VideoError(f"its frames are {width}x{height} pixels, and decord garbles "
                                 f"frames under {DECORD_MIN_SIDE} pixels wide or high; decode "
                                 "it with decode.backend: pyav")
            self._index = MediaIndex.build(container, stream)
            frame_bytes = max(1, (width or 1) * (height or 1) * 3)
        finally:
            container.close()
        self._batch_frames = max(1, min(DECORD_BATCH_FRAMES, DECORD_BATCH_BYTES // frame_bytes))
        self._reader = self._new_reader()
        # Both count the stream's packets; should they differ, only frames both know are read.
        self._frames = min(len(self._index), len(self._reader))

    def _new_reader(self) -> Any:
        import decord

        self._reader = None  # the old one's thread stops and its frames are freed first
        try:
            reader = decord.VideoReader(self.target, ctx=decord.cpu(0), num_threads=1)
        except Exception as exc:
            raise VideoError(f"cannot open it: {decord_message(exc)}") from None
        self._fresh = True
        return reader

    def _batch(self, chunk: list[int]) -> np.ndarray:
        """The frames ``chunk`` from decord, its thread stopped after them; after an error,
        the first of them alone from a fresh reader, and should that fail too, from PyAV
        (see the class docstring)."""
        fresh, self._fresh = self._fresh, False
        try:
            return self._stopped(self._reader.get_batch(chunk).asnumpy())
        except Exception as exc:
            if fresh and len(chunk) == 1:
                return self._confirmed(chunk[0], exc)
        self._reader = self._new_reader()
        self._fresh = False
        try:
            return self._stopped(self._reader.get_batch(chunk[:1]).asnumpy())
        except Exception as exc:
            return self._confirmed(chunk[0], exc)

    def _confirmed(self, target: int, exc: Exception) -> np.ndarray:
        """Frame ``target`` decoded by PyAV after a fresh decord reader failed on it alone,
        or decord's error ``exc`` when PyAV fails on it too.

        decord's thread runs ahead of the frame asked for, so whether a frame just before
        damage is handed over or lost to the error depends on how far the thread got: on a
        busy machine it can be lost. PyAV decodes nothing ahead of its caller, so it tells a
        damaged frame from a racing thread, and the segment ends at the same frame as with
        ``decode.backend: pyav`` however busy the machine. (A video decord fails on
        throughout is so decoded by PyAV from the first such frame on: one PyAV decoder,
        kept open, reads on from frame to frame.)
        """
        if self._pyav is None:  # kept open: it reads on from where it was, as a segment does
            self._pyav = AVSegment(self.target, [])
        try:
            return self._pyav._read(target).rgb[None]
        except Exception:
            raise exc from None

    def _stopped(self, rgb: np.ndarray) -> np.ndarray:
        self._reader.seek(0)  # stops decord's thread; the next batch seeks where it needs
        return rgb

    def close(self) -> None:
        self._reader = None
        self._ready = []
        if self._pyav is not None:
            self._pyav.close()
            self._pyav = None


def open_segment(target: str, indices: list[int], backend: str = "pyav"
                 ) -> "AVSegment | DecordSegment":
    """The child's decoder for one segment, by ``decode.backend``."""
    if backend == "pyav":
        return AVSegment(target, indices)
    if backend == "decord":
        return DecordSegment(target, indices)
    raise ValueError(f"unknown decoder backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# -- in the driver and the actors -------------------------------------------------------------

def _fs_path(fs: Any, uri: str) -> str:
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    return uri.split("://", 1)[1] if "://" in uri else uri


class _Target:
    """What the decoder child opens: a local path, or a loopback proxy URL for anything
    else (registered for as long as the target is open)."""

    def __init__(self, fs: Any, uri: str, size_bytes: int | None = None):
        from fsspec.implementations.local import LocalFileSystem

        self.url: str | None = None
        self.size = size_bytes
        if isinstance(fs, LocalFileSystem):
            self.value = _fs_path(fs, uri)
        else:
            from .proxy import shared_proxy

            path = _fs_path(fs, uri)
            if self.size is None:
                self.size = int(fs.info(path)["size"])
            self.url = self.value = shared_proxy().register(fs, path, self.size)

    def failure(self) -> BaseException | None:
        """The store's error, when reading the object through the proxy failed."""
        if self.url is None:
            return None
        from .proxy import shared_proxy

        return shared_proxy().failure(self.url)

    def close(self) -> None:
        if self.url:
            from .proxy import shared_proxy

            shared_proxy().unregister(self.url)
            self.url = None


def probe(fs: Any, uri: str, size_bytes: int | None = None,
          timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = 1) -> dict[str, Any]:
    """Frames, frame rate, duration and frame size of a video (``probe_target``), probed in
    a decoder child. Raises :class:`VideoError` with a readable message when the video
    cannot be opened (what the file is, see :func:`diagnose`), when the decoder crashes or
    hangs on it (``retries`` + 1 attempts), or when the store fails."""
    from .isolation import DecoderFailed, shared_pool

    try:
        target = _Target(fs, uri, size_bytes)
    except OSError as exc:
        raise VideoError(storage_failure(exc)) from None
    try:
        failure = None
        for _ in range(retries + 1):
            pool = shared_pool()
            proc = pool.take()
            try:
                proc.send(("probe", target.value, target.size))
                reply = proc.receive(timeout_s)
            except DecoderFailed as exc:
                proc.kill()
                failure = exc
                continue
            pool.give(proc)
            if reply[0] == "ok":
                return reply[1]
            raise VideoError(_explained(reply[1], fs, uri, size_bytes, target))
        attempts = retries + 1
        raise VideoError(public_text(f"the decoder {failure} while opening the video "
                                     f"({attempts} attempt{'s' if attempts > 1 else ''})",
                                     target.url, uri))
    finally:
        target.close()


def _explained(message: str, fs: Any, uri: str, size_bytes: int | None,
               target: _Target) -> str:
    """The decoder's ``message`` preceded by what the file is, when that can be told."""
    store = target.failure()
    what = storage_failure(store) if store is not None else None
    if what is None:
        try:
            what = diagnose(fs, uri, size_bytes)
        except Exception:  # the diagnosis is a courtesy; the decoder's message stands
            what = None
    text = f"{what} (decoder: {message})" if what else message
    return public_text(text, target.url, uri)


@dataclass
class SegmentDecoder:
    """The sampled frames ``indices`` (sorted, within one segment) of one video, in order,
    decoded in a child process (see the module docstring).

    :meth:`read` returns the next frame, or None when the segment is done or the decoder
    failed; then ``error`` says why (a clean end leaves it None). Frames decoded before an
    error are kept by the caller: the segment is *partial*. A child that crashes, or makes
    no progress for ``timeout_s``, is replaced by a fresh one that starts at the first frame
    not yet delivered, at most ``retries`` times in the segment.
    """

    fs: Any
    uri: str
    indices: list[int]
    size_bytes: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    slots: int = 0                      # 0: isolation.RING_SLOTS
    backend: str = "pyav"               # what decodes in the child (BACKENDS)
    error: str | None = None
    frames_decoded: int = 0
    decode_s: float = 0.0
    restarts: int = 0                   # children replaced after a crash or hang
    _next: int = field(default=0, repr=False)
    _target: _Target | None = field(default=None, repr=False)
    _proc: Any = field(default=None, repr=False)
    _ring: Any = field(default=None, repr=False)
    _shape: tuple[int, int, int] = field(default=(0, 0, 3), repr=False)

    @property
    def child_pid(self) -> int | None:
        """The decoder child working on this segment now (for diagnostics and tests)."""
        return self._proc.pid if self._proc is not None else None

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
        from .isolation import DecoderFailed

        # After the last frame the child still owes its "end": collect it, so that the child
        # goes back to the pool instead of being killed as if it had been abandoned.
        while self.error is None and (self._next < len(self.indices) or self._proc is not None):
            try:
                if self._proc is None:
                    self._start()
                msg = self._proc.receive(self.timeout_s)
                if msg[0] == "frame" and self._next < len(self.indices):
                    return self._take(msg)
                if msg[0] == "shape":
                    self._make_ring(msg[1], msg[2])
                elif msg[0] == "end":
                    self._end(msg[1])
            except DecoderFailed as exc:
                self._failed(exc)
            except OSError as exc:  # the store (registering the object), the ring, a fork
                self.close()
                if self._next < len(self.indices):
                    self.error = self._public(f"decoding failed at frame "
                                              f"{self.indices[self._next]}: "
                                              f"{storage_failure(exc)}")
        return None

    def _start(self) -> None:
        from .isolation import shared_pool

        if self._target is None:
            self._target = _Target(self.fs, self.uri, self.size_bytes)
        self._proc = shared_pool().take()
        self._proc.send(("decode", self._target.value, self.indices[self._next:],
                         {"backend": self.backend}))

    def _make_ring(self, height: int, width: int) -> None:
        from .isolation import RING_SLOTS, FrameRing

        self._drop_ring()
        self._shape = (height, width, 3)
        slots = self.slots or RING_SLOTS
        self._ring, fd = FrameRing.create(slots, height * width * 3)
        try:
            self._proc.send(("ring", slots, self._ring.slot_bytes))
            self._proc.send_handle(fd)
        finally:
            os.close(fd)

    def _take(self, msg: tuple) -> Frame:
        _, index, timestamp_s, slot = msg
        rgb = self._ring.take(slot, self._shape)
        self._proc.send(("free", slot))
        return Frame(int(index), float(timestamp_s), rgb)

    def _end(self, error: str | None) -> None:
        from .isolation import shared_pool

        proc, self._proc = self._proc, None
        self._drop_ring()
        shared_pool().give(proc)
        if error is None and self._next < len(self.indices):  # never claim more than we got
            error = (f"decoding failed at frame {self.indices[self._next]}: the decoder "
                     "stopped early")
        if error is not None:
            self.error = self._public(error)

    def _failed(self, exc: Exception) -> None:
        """The child crashed or hung: replace it, or give up after ``retries``."""
        if self._proc is not None:
            self._proc.kill()
            self._proc = None
        self._drop_ring()
        if self._next >= len(self.indices):
            return  # it died after its last frame: nothing is missing
        at = self.indices[self._next]
        if self.restarts >= self.retries:
            attempts = self.restarts + 1
            self.error = self._public(
                f"decoding failed at frame {at}: the decoder {exc} ({attempts} attempt"
                f"{'s' if attempts > 1 else ''})", explain=False)
            return
        self.restarts += 1
        print(f"vidprune decoder: {self._public(f'the decoder {exc}', explain=False)} on "
              f"{self.uri} at frame {at}; restarting it ({self.restarts} of {self.retries})",
              file=sys.stderr, flush=True)

    def _public(self, text: str, explain: bool = True) -> str:
        """``text`` (``decoding failed at frame N: detail``) for outputs; with ``explain``,
        what went wrong underneath when that can be told: a failed read from the store, or
        what :func:`diagnose` finds (the file gone, truncated ...)."""
        head, _, detail = text.partition(": ")
        store = self._target.failure() if self._target and explain else None
        if store is not None:
            text = f"{head}: {storage_failure(store)}"
        elif explain:
            try:
                what = diagnose(self.fs, self.uri, self.size_bytes)
            except Exception:  # a courtesy: the decoder's message stands
                what = None
            if what and what.startswith(("the file is gone", "access denied", "reading it")):
                text = f"{head}: {what}"
            elif what:
                text = f"{head}: {what} (decoder: {detail})"
        return public_text(text, self._target.url if self._target else None, self.uri)

    def _drop_ring(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    @property
    def done(self) -> bool:
        return self.error is not None or self._next >= len(self.indices)

    def close(self) -> None:
        if self._proc is not None:  # closed mid-segment: the child is busy; do not reuse it
            self._proc.kill()
            self._proc = None
        self._drop_ring()
        if self._target is not None:
            self._target.close()
            self._target = None
