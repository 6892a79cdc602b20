"""A job's output location: names, the per-segment writer the actors use, and readers.

Completion convention (resume and exactly-once build on it): a segment is done when
``segments/<segment_id>.parquet`` exists. The writer writes ``annotations/<segment_id>.parquet``
first and the segment's stats file last, each atomically, under names that depend only on
the segment; a retried or resumed segment overwrites the same two files, so results are
never duplicated, and a segment that died half-way has no marker and is run again.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .schemas import MANIFEST, SEGMENTS, VIDEOS, annotation_schema, columns_to_table, to_table
from .storage import Location, parquet_bytes, pyarrow_filesystem

JOB_FILE = "job.json"
MANIFEST_FILE = "manifest/manifest.parquet"
ANNOTATIONS = "annotations"
SEGMENTS_DIR = "segments"
VIDEOS_FILE = "videos/videos.parquet"
#: Everything vidprune writes at the top of an output location (``overwrite`` removes these
#: and nothing else; ``report`` is written by ``vidprune report``).
KNOWN_ENTRIES = (JOB_FILE, "manifest", ANNOTATIONS, SEGMENTS_DIR, "videos", "report")


def segment_file(folder: str, segment_id: str) -> str:
    return f"{folder}/{segment_id}.parquet"


@dataclass
class SegmentWriter:
    """Writes one segment's results; pickled into every annotator actor."""

    location: Location
    task: str

    def write(self, segment_id: str, annotations: dict[str, list], stats: dict[str, Any]
              ) -> None:
        table = columns_to_table(annotations, annotation_schema(self.task))
        self.location.write_bytes(segment_file(ANNOTATIONS, segment_id), parquet_bytes(table))
        # Last: the marker that says the segment is complete.
        self.location.write_bytes(segment_file(SEGMENTS_DIR, segment_id),
                                  parquet_bytes(to_table([stats], SEGMENTS)))


def completed_segments(location: Location) -> set[str]:
    """Ids of the segments whose completion marker exists."""
    return {name[:-len(".parquet")] for name in location.files(SEGMENTS_DIR)
            if name.endswith(".parquet")}


def read_parquet(location: Location, name: str, schema: pa.Schema) -> pa.Table:
    """One Parquet file of the output, cast to ``schema``."""
    return pq.read_table(io.BytesIO(location.read_bytes(name))).cast(schema)


def read_folder(location: Location, folder: str, schema: pa.Schema,
                names: list[str] | None = None) -> pa.Table:
    """Every Parquet file in ``folder`` (or the files ``names`` in it), as one table."""
    files = names if names is not None else [n for n in location.files(folder)
                                             if n.endswith(".parquet")]
    if not files:
        return schema.empty_table()
    import pyarrow.dataset as ds

    dataset = ds.dataset([location.path(folder, n) for n in files], schema=schema,
                         format="parquet", filesystem=pyarrow_filesystem(location.fs))
    return dataset.to_table()


def read_manifest(location: Location) -> pa.Table:
    return read_parquet(location, MANIFEST_FILE, MANIFEST)


def read_segments(location: Location, segment_ids: list[str] | None = None) -> pa.Table:
    names = None if segment_ids is None else [f"{s}.parquet" for s in segment_ids]
    return read_folder(location, SEGMENTS_DIR, SEGMENTS, names)


def read_annotations(location: Location, task: str) -> pa.Table:
    return read_folder(location, ANNOTATIONS, annotation_schema(task))


def read_videos(location: Location) -> pa.Table:
    return read_parquet(location, VIDEOS_FILE, VIDEOS)
