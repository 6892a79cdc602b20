"""Finding the videos of a job and probing them (in a thread pool, or spread over a Ray
cluster's nodes).

A probe records what segmentation needs: frames, frame rate, duration and frame size. It
runs in a decoder child process (``operators/decode.py``: a file that crashes or hangs FFmpeg
costs the child, never the driver). For MP4/MOV files it reads the container header
(``operators/headers.py``: a few reads instead of the whole file); for other containers (and
headers that cannot be trusted) it opens the video as the annotator will, which reads the
whole file. A probe that fails is not fatal: the video becomes an error row. Inputs that
cannot be videos (a folder named like one, a named pipe, an ambiguous S3 key) are rows with
their problem from the listing on.

On a cluster, :func:`probe_videos_on_cluster` spreads the probes over the nodes in Ray
tasks, so the reads (whole files for full probes) are not all funnelled through the
driver's network link.
"""

from __future__ import annotations

import fnmatch
import math
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from operators.retry import retry

from .storage import StorageError, identity, is_local, uri_of

DEFAULT_PATTERNS = ("*.mp4", "*.mkv", "*.avi", "*.mov", "*.webm", "*.m4v", "*.mpg",
                    "*.mpeg", "*.ts", "*.flv", "*.wmv", "*.3gp")


@dataclass(frozen=True)
class VideoObject:
    uri: str
    size_bytes: int
    identity: str  # changes when the content changes (ETag, or size + mtime)
    problem: str | None = None  # known from the listing alone: it cannot be a video

#: Why a listed name is refused before anything opens it.
FOLDER = "a folder named like a video, not a video file"
NOT_REGULAR = "not a regular file (a named pipe, socket or device)"
BROKEN_LINK = "a symbolic link to a file that does not exist"
AMBIGUOUS = ("its key has '.', '..' or empty path segments, which other tools resolve to a "
             "different object; vidprune does not read it (rename the object)")


def matches(relative_path: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Case-insensitive: patterns with a ``/`` match the path relative to the input folder,
    the others the file name."""
    name = posixpath.basename(relative_path).lower()
    rel = relative_path.lower()
    for pattern in patterns:
        p = pattern.lower()
        if fnmatch.fnmatchcase(rel if "/" in p else name, p):
            return True
    return False


def list_videos(fs: Any, root: str, patterns: list[str] | tuple[str, ...]) -> list[VideoObject]:
    """Every file under ``root`` (recursively) that matches ``patterns``, sorted by URI.
    ``root`` may also be a single file, which is taken whatever its name."""
    # On a store, transient errors are retried and missing credentials said at once.
    where = uri_of(fs, root)
    call = (lambda fn: fn()) if is_local(fs) else (lambda fn: retry(fn, f"listing {where}"))
    try:
        info = call(lambda: fs.info(root))
    except FileNotFoundError:
        raise StorageError(f"input {uri_of(fs, root)} does not exist") from None
    except PermissionError as exc:
        raise StorageError(f"input {uri_of(fs, root)} is not readable: {exc}") from None
    if info.get("type") == "file":
        return [VideoObject(uri_of(fs, root), int(info.get("size") or 0), identity(info))]
    found = call(lambda: fs.find(root, detail=True, withdirs=True))
    out: dict[str, VideoObject] = {}
    prefix = root.rstrip("/") + "/"
    for path, entry in found.items():
        kind = entry.get("type")
        folder = kind == "directory" or (kind == "file" and path.endswith("/"))
        if path.rstrip("/") == root.rstrip("/"):
            continue
        path = path.rstrip("/") if folder else path
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
        parts = rel.split("/")
        # Object-store keys may hold '..' or '//', which local tools and URL libraries
        # resolve to another object: such a key is reported, never read.
        odd = any(part in ("", ".", "..") for part in parts)
        if not odd and any(part.startswith(".") for part in parts):
            continue  # hidden files and folders (.DS_Store, .git, partial uploads)
        if not matches(rel, patterns):
            continue
        uri = uri_of(fs, path)
        if entry.get("islink"):  # a local link: it stands for what it points to
            try:
                entry = fs.info(path)  # follows the link
            except FileNotFoundError:
                out[uri] = VideoObject(uri, 0, "link", BROKEN_LINK)
                continue
            except OSError as exc:  # a loop of links, a target we may not look at
                out[uri] = VideoObject(uri, 0, "link", f"a symbolic link whose target cannot "
                                                       f"be read ({exc.strerror or exc})")
                continue
            kind = entry.get("type")
            folder = kind == "directory"
        if folder:
            out.setdefault(uri, VideoObject(uri, 0, "folder", FOLDER))
        elif kind != "file":  # opening a named pipe would block forever
            out[uri] = VideoObject(uri, 0, str(kind), NOT_REGULAR)
        else:
            out[uri] = VideoObject(uri, int(entry.get("size") or 0), identity(entry),
                                   AMBIGUOUS if odd else None)
    return sorted(out.values(), key=lambda v: v.uri)


def probe_videos(fs: Any, videos: list[VideoObject], workers: int = 8,
                 on_done: Callable[[int, int], None] | None = None,
                 known: dict[tuple[str, str], dict[str, Any]] | None = None,
                 timeout_s: float | None = None) -> list[dict[str, Any]]:
    """Probe each video (see :func:`operators.decode.probe`, which runs the decoder in a
    child process, killed after ``timeout_s`` without progress); a failure becomes
    ``probe_error``. ``known``: probe results by (uri, identity) to reuse instead (a video
    whose identity is unchanged has not changed). Results are in the order of ``videos``."""
    known = known or {}
    from operators.decode import DEFAULT_TIMEOUT_S, VideoError, clean_error, probe

    timeout_s = timeout_s or DEFAULT_TIMEOUT_S

    done = 0
    lock = threading.Lock()

    def one(video: VideoObject) -> dict[str, Any]:
        nonlocal done
        row: dict[str, Any] = {"uri": video.uri, "size_bytes": video.size_bytes,
                               "identity": video.identity, "frames_total": 0, "fps": 0.0,
                               "width": 0, "height": 0, "duration_s": 0.0, "probe_error": None,
                               "probe_warning": None}
        try:
            if video.problem:
                raise VideoError(video.problem)
            if video.size_bytes == 0:
                raise VideoError("an empty file (0 bytes)")
            row.update(known.get((video.uri, video.identity))
                       or probe(fs, video.uri, video.size_bytes, timeout_s=timeout_s))
        except Exception as exc:
            row["probe_error"] = clean_error(exc, uri=video.uri)
        with lock:
            done += 1
            if on_done:
                on_done(done, len(videos))
        return row

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, videos))


def _probe_batch(fs: Any, videos: list[VideoObject], timeout_s: float | None
                 ) -> list[dict[str, Any]]:
    return probe_videos(fs, videos, workers=8, timeout_s=timeout_s)


def probe_videos_on_cluster(fs: Any, videos: list[VideoObject], nodes: int,
                            known: dict[tuple[str, str], dict[str, Any]] | None = None,
                            timeout_s: float | None = None) -> list[dict[str, Any]]:
    """:func:`probe_videos`, with the videos not in ``known`` probed by Ray tasks spread
    over the cluster (about two tasks per node, at least 8 videos each, each probing its
    share in a thread pool). Results are in the order of ``videos``."""
    import ray

    known = known or {}
    todo = [v for v in videos if (v.uri, v.identity) not in known]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    if todo:
        size = max(8, min(256, math.ceil(len(todo) / (2 * max(1, nodes)))))
        task = ray.remote(_probe_batch).options(num_cpus=1, scheduling_strategy="SPREAD",
                                                max_retries=3)
        refs = [task.remote(fs, todo[i:i + size], timeout_s)
                for i in range(0, len(todo), size)]
        for rows in ray.get(refs):
            for row in rows:
                results[(row["uri"], row["identity"])] = row
    rest = [v for v in videos if (v.uri, v.identity) in known]
    for row in probe_videos(fs, rest, known=known):
        results[(row["uri"], row["identity"])] = row
    return [results[(v.uri, v.identity)] for v in videos]
