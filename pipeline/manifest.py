"""The segment manifest: one row per segment of every probed video, longest first.

Ids are deterministic, so a job run again finds its own earlier work:

- ``video_id`` = hash of the video's URI (stable across runs and settings, for joins);
- ``segment_id`` = hash of the job fingerprint, the video's URI and content identity, and the
  segment's frame span. A segment id names one piece of work with one set of settings on one
  version of a video; its completion marker (``segments/<segment_id>.parquet``) is what
  ``resume`` looks for.

The job fingerprint covers everything that changes results: the model (and the identity of
its checkpoint), the method and its full parameters, and the decode settings. Resources, the
job name and the output mode do not change results and are not in it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from operators.decode import sampled_indices, sampling_ratio

from .schemas import MANIFEST, to_table


def _digest(text: str, chars: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:chars]


def video_id(uri: str) -> str:
    return _digest(uri, 16)


def segment_id(fingerprint: str, uri: str, identity: str, start_frame: int, end_frame: int
               ) -> str:
    return _digest(f"{fingerprint}\n{uri}\n{identity}\n{start_frame}:{end_frame}", 24)


def fingerprint(inputs: dict[str, Any]) -> str:
    """A short hash of the settings that change results (canonical JSON)."""
    return _digest(json.dumps(inputs, sort_keys=True, default=str), 16)


def segment_spans(frames_total: int, segment_frames: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans of ``segment_frames`` frames; the last one shorter."""
    return [(start, min(frames_total, start + segment_frames))
            for start in range(0, frames_total, segment_frames)]


def build_manifest(probes: list[dict[str, Any]], segment_frames: int, job_fingerprint: str,
                   fps: float | None = None, frame_stride: int = 1) -> pa.Table:
    """Segment rows for every probed video (see ``schemas.MANIFEST``), the segments with the
    most frames to process first so long videos start early and do not become stragglers;
    videos that could not be probed follow as one row each with ``probe_error`` set.
    ``fps`` and ``frame_stride`` are the job's frame sampling (``operators.decode``)."""
    rows, failed = [], []
    for p in probes:
        vid = video_id(p["uri"])
        common = {"video_id": vid, "uri": p["uri"], "identity": p["identity"],
                  "frames_total": int(p["frames_total"]), "fps": float(p["fps"]),
                  "width": int(p["width"]), "height": int(p["height"]),
                  "duration_s": float(p["duration_s"]), "size_bytes": int(p["size_bytes"]),
                  "probe_warning": p.get("probe_warning")}
        error = p.get("probe_error") or (None if int(p["frames_total"]) > 0 else
                                         "no video frames")
        if error:
            failed.append({**common, "segment_id": segment_id(job_fingerprint, p["uri"],
                                                              p["identity"], 0, 0),
                           "segment_index": 0, "segments_total": 0, "start_frame": 0,
                           "end_frame": 0, "frames_expected": 0,
                           "probe_error": error})
            continue
        spans = segment_spans(int(p["frames_total"]), segment_frames)
        ratio = sampling_ratio(float(p["fps"]), fps, frame_stride)
        for index, (start, end) in enumerate(spans):
            rows.append({**common, "segment_id": segment_id(job_fingerprint, p["uri"],
                                                            p["identity"], start, end),
                         "segment_index": index, "segments_total": len(spans),
                         "start_frame": start, "end_frame": end,
                         "frames_expected": len(sampled_indices(start, end, ratio)),
                         "probe_error": None})
    rows.sort(key=lambda r: (-r["frames_expected"], -(r["end_frame"] - r["start_frame"]),
                             r["uri"], r["segment_index"]))
    failed.sort(key=lambda r: r["uri"])
    return to_table(rows + failed, MANIFEST)
