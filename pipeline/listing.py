"""Finding the videos of a job and probing them (in a thread pool, or spread over a Ray
cluster's nodes).

A probe records what segmentation needs: frames, frame rate, duration and frame size. For
MP4/MOV files it reads the container header (``operators/headers.py``: a few reads instead
of the whole file); for other containers it opens the video with decord exactly as the
annotator will (local path, or the loopback range proxy for object stores), which reads the
whole file. A probe that fails is not fatal: the video becomes an error row.

On a cluster, :func:`probe_videos_on_cluster` spreads the probes over the nodes in Ray
tasks, so the reads (whole files for decord's probes) are not all funnelled through the
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

from .storage import StorageError, identity, uri_of

DEFAULT_PATTERNS = ("*.mp4", "*.mkv", "*.avi", "*.mov", "*.webm", "*.m4v", "*.mpg",
                    "*.mpeg", "*.ts", "*.flv", "*.wmv", "*.3gp")


@dataclass(frozen=True)
class VideoObject:
    uri: str
    size_bytes: int
    identity: str  # changes when the content changes (ETag, or size + mtime)


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
    try:
        info = fs.info(root)
    except FileNotFoundError:
        raise StorageError(f"input {uri_of(fs, root)} does not exist") from None
    except PermissionError as exc:
        raise StorageError(f"input {uri_of(fs, root)} is not readable: {exc}") from None
    if info.get("type") == "file":
        return [VideoObject(uri_of(fs, root), int(info.get("size") or 0), identity(info))]
    found = fs.find(root, detail=True)
    out = []
    prefix = root.rstrip("/") + "/"
    for path, entry in found.items():
        if entry.get("type") != "file":
            continue
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files and folders (.DS_Store, .git, partial uploads)
        if matches(rel, patterns):
            out.append(VideoObject(uri_of(fs, path), int(entry.get("size") or 0),
                                   identity(entry)))
    return sorted(out, key=lambda v: v.uri)


def probe_videos(fs: Any, videos: list[VideoObject], workers: int = 8,
                 on_done: Callable[[int, int], None] | None = None,
                 known: dict[tuple[str, str], dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """Probe each video (see :func:`operators.decode.probe`); a failure becomes
    ``probe_error``. ``known``: probe results by (uri, identity) to reuse instead (a video
    whose identity is unchanged has not changed). Results are in the order of ``videos``."""
    known = known or {}
    from operators.decode import clean_error, probe
    from operators.headers import header_probe

    done = 0
    lock = threading.Lock()

    def one(video: VideoObject) -> dict[str, Any]:
        nonlocal done
        row: dict[str, Any] = {"uri": video.uri, "size_bytes": video.size_bytes,
                               "identity": video.identity, "frames_total": 0, "fps": 0.0,
                               "width": 0, "height": 0, "duration_s": 0.0, "probe_error": None}
        try:
            if video.size_bytes == 0:
                raise ValueError("empty file (0 bytes)")
            row.update(known.get((video.uri, video.identity))
                       or header_probe(fs, video.uri, video.size_bytes)
                       or probe(fs, video.uri, video.size_bytes))
        except Exception as exc:
            row["probe_error"] = clean_error(exc, uri=video.uri)
        with lock:
            done += 1
            if on_done:
                on_done(done, len(videos))
        return row

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, videos))


def _probe_batch(fs: Any, videos: list[VideoObject]) -> list[dict[str, Any]]:
    return probe_videos(fs, videos, workers=8)


def probe_videos_on_cluster(fs: Any, videos: list[VideoObject], nodes: int,
                            known: dict[tuple[str, str], dict[str, Any]] | None = None
                            ) -> list[dict[str, Any]]:
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
        refs = [task.remote(fs, todo[i:i + size]) for i in range(0, len(todo), size)]
        for rows in ray.get(refs):
            for row in rows:
                results[(row["uri"], row["identity"])] = row
    rest = [v for v in videos if (v.uri, v.identity) in known]
    for row in probe_videos(fs, rest, known=known):
        results[(row["uri"], row["identity"])] = row
    return [results[(v.uri, v.identity)] for v in videos]
