"""Every table vidprune writes, declared once. Writers, readers, the report and the tests all
import these; docs/OUTPUTS.md describes them column by column.

Layout of a job's output location::

    job.json                         the spec as run, versions, times, totals
    manifest/manifest.parquet        MANIFEST: one row per segment (and per unreadable video)
    annotations/<segment_id>.parquet DETECTIONS or RECOGNITIONS rows of one segment
    segments/<segment_id>.parquet    SEGMENTS: one row; its existence marks the segment done
    videos/videos.parquet            VIDEOS: one row per video
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")


def _schema(*fields: tuple[str, pa.DataType] | tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([pa.field(f[0], f[1], nullable=f[2] if len(f) > 2 else False)
                      for f in fields])


MANIFEST = _schema(
    ("segment_id", pa.string()),
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("identity", pa.string()),            # ETag, or size + mtime: changes with the content
    ("segment_index", pa.int32()),
    ("segments_total", pa.int32()),
    ("start_frame", pa.int64()),
    ("end_frame", pa.int64()),            # exclusive
    ("frames_expected", pa.int64()),      # frames the job samples in [start_frame, end_frame)
    ("frames_total", pa.int64()),
    ("fps", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("duration_s", pa.float64()),
    ("size_bytes", pa.int64()),
    ("probe_error", pa.string(), True),   # set: the video could not be opened; no segments
    ("probe_warning", pa.string(), True), # set: readable but incomplete (the video is partial)
)

DETECTIONS = _schema(
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("segment_id", pa.string()),
    ("frame_index", pa.int64()),          # global, in the original video
    ("timestamp_s", pa.float64()),
    ("label", pa.string()),
    ("label_id", pa.int32()),
    ("score", pa.float32()),
    ("x0", pa.float32()),                 # pixels of the original frame
    ("y0", pa.float32()),
    ("x1", pa.float32()),
    ("y1", pa.float32()),
)

RECOGNITIONS = _schema(
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("segment_id", pa.string()),
    ("clip_start_s", pa.float64()),
    ("clip_end_s", pa.float64()),
    ("first_frame", pa.int64()),          # global indices of the clip's first and last frame
    ("last_frame", pa.int64()),
    ("frames", pa.int32()),               # the video's frames in the clip; fewer than the
                                          # model's clip in a segment too short for one
    ("rank", pa.int32()),                 # 1 = most likely
    ("label", pa.string()),
    ("label_id", pa.int32()),
    ("score", pa.float32()),
)

_COST = (
    ("gmacs_dense", pa.float64()),        # the same model run densely on the same frames
    ("gmacs_run", pa.float64()),          # backbone + method overhead actually executed
    ("gmacs_overhead", pa.float64()),     # the method's own share of gmacs_run
    ("gmacs_padding", pa.float64(), True),  # run on padding rows of ragged lockstep batches,
                                          # not in gmacs_run; null in outputs written before
                                          # vidprune reported it
    ("gmacs_dense_first", pa.float64()),  # the first frame (or clip) of each segment
    ("gmacs_run_first", pa.float64()),
    ("tokens_dense", pa.float64()),
    ("tokens_run", pa.float64()),
    ("decode_s", pa.float64()),
    ("model_s", pa.float64()),
    ("wall_s", pa.float64()),
)

_WHO = (
    ("node_id", pa.string()),
    ("actor_id", pa.string()),
    ("device", pa.string()),
    ("started_at", TIMESTAMP),
    ("finished_at", TIMESTAMP),
    ("job_id", pa.string()),
)

SEGMENTS = _schema(
    ("segment_id", pa.string()),
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("segment_index", pa.int32()),
    ("segments_total", pa.int32()),
    ("start_frame", pa.int64()),
    ("end_frame", pa.int64()),
    ("status", pa.string()),              # ok | partial | error
    ("error", pa.string(), True),
    ("frames_expected", pa.int64()),      # sampled frames in [start_frame, end_frame)
    ("frames_decoded", pa.int64()),
    ("first_frame", pa.int64(), True),    # first and last decoded frame (global index)
    ("last_frame", pa.int64(), True),
    ("annotations", pa.int64()),          # rows written to annotations/<segment_id>.parquet
    *_COST,
    *_WHO,
    ("fingerprint", pa.string()),
)

VIDEOS = _schema(
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("status", pa.string()),              # ok | partial | error
    ("error", pa.string(), True),
    ("frames_total", pa.int64()),
    ("frames_expected", pa.int64()),
    ("frames_decoded", pa.int64()),
    ("duration_s", pa.float64()),
    ("fps", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("size_bytes", pa.int64()),
    ("segments", pa.int32()),
    ("task", pa.string()),
    ("model", pa.string()),
    ("method", pa.string()),
    ("params", pa.string()),              # the method's parameters, JSON
    ("savings", pa.float64()),            # 1 - gmacs_run / gmacs_dense (0 when nothing ran)
    *_COST,
    ("node_id", pa.string(), True),       # comma-separated when segments ran in several places
    ("actor_id", pa.string(), True),
    ("device", pa.string(), True),
    ("started_at", TIMESTAMP, True),      # null for a video that never reached an actor
    ("finished_at", TIMESTAMP, True),
    ("job_id", pa.string()),
)

STATUSES = ("ok", "partial", "error")


def annotation_schema(task: str) -> pa.Schema:
    return {"detection": DETECTIONS, "recognition": RECOGNITIONS}[task]


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts with exactly the schema's columns) as a table of that schema."""
    rows = list(rows)
    names = set(schema.names)
    for row in rows:
        if set(row) != names:
            missing, extra = sorted(names - set(row)), sorted(set(row) - names)
            raise ValueError(f"row does not match the schema: missing {missing}, extra {extra}")
    return pa.Table.from_pylist(rows, schema=schema)


def columns_to_table(columns: dict[str, list], schema: pa.Schema) -> pa.Table:
    """Columns (lists with exactly the schema's names) as a table of that schema."""
    if set(columns) != set(schema.names):
        raise ValueError(f"columns do not match the schema: {sorted(set(columns) ^ set(schema.names))}")
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in schema],
                                schema=schema)
