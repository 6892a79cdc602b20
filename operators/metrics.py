"""Live savings on the Ray dashboard and in Prometheus: custom metrics of a running job.

Annotator actors count every segment they finish; the driver counts videos as their last
segment completes. Ray exports them from each node's metrics port (``ray start
--metrics-export-port``) with a ``ray_`` prefix, counters with a ``_total`` suffix:

=========================================  ====================================================
``ray_vidprune_frames_total``              frames decoded and run through the model
``ray_vidprune_gmacs_dense_total``         backbone GMACs the model would run densely
``ray_vidprune_gmacs_run_total``           backbone GMACs actually run (method overhead in)
``ray_vidprune_gmacs_padding_total``       backbone GMACs run on padding rows of ragged batches
``ray_vidprune_segments_total``            segments finished, tagged ``status`` (ok/partial/error)
``ray_vidprune_segment_errors_total``      segments that ended partial or with an error
``ray_vidprune_videos_done_total``         videos whose every segment finished (driver)
=========================================  ====================================================

Every series is tagged ``job`` (the spec's name), ``model`` and ``method``, so one query
gives a job's running savings: ``1 - sum(rate(ray_vidprune_gmacs_run_total[5m])) /
sum(rate(ray_vidprune_gmacs_dense_total[5m]))``. Counters count work done, retried work
included (a segment run twice is counted twice); the Parquet outputs are the record.

Outside Ray (a unit test calling the actor directly) recording does nothing.
"""

from __future__ import annotations

from typing import Any

TAG_KEYS = ("job", "model", "method")
_AMOUNTS = (("vidprune_frames", "frames_decoded", "frames decoded and run through the model"),
            ("vidprune_gmacs_dense", "gmacs_dense", "backbone GMACs a dense model would run"),
            ("vidprune_gmacs_run", "gmacs_run", "backbone GMACs actually run"),
            ("vidprune_gmacs_padding", "gmacs_padding",
             "backbone GMACs run on padding rows of ragged batches"))
_METRICS: dict[str, Any] = {}


def _counter(name: str, description: str, extra_tags: tuple[str, ...] = ()):
    """One Counter per name and process (Ray keeps one series per name and tags)."""
    if name not in _METRICS:
        from ray.util.metrics import Counter

        _METRICS[name] = Counter(name, description=description,
                                 tag_keys=TAG_KEYS + extra_tags)
    return _METRICS[name]


class JobMetrics:
    """The metrics of one job, with its tags (see the module docstring)."""

    def __init__(self, job: str, model: str, method: str):
        self.tags = {"job": str(job), "model": str(model), "method": str(method)}
        try:
            import ray

            self.enabled = ray.is_initialized()
        except ImportError:  # pragma: no cover - ray is a hard dependency
            self.enabled = False

    def segment_done(self, stats: dict[str, Any]) -> None:
        """Count a finished segment from its stats row (``schemas.SEGMENTS``)."""
        if not self.enabled:
            return
        tags = self.tags
        for name, key, description in _AMOUNTS:
            value = float(stats.get(key) or 0.0)
            if value > 0:  # Ray's counters refuse increments of 0
                _counter(name, description).inc(value, tags)
        _counter("vidprune_segments", "segments finished", ("status",)).inc(
            1, {**tags, "status": str(stats["status"])})
        if stats["status"] != "ok":
            _counter("vidprune_segment_errors", "segments that ended partial or with an "
                                                "error").inc(1, tags)

    def videos_done(self, count: int = 1) -> None:
        if self.enabled and count:
            _counter("vidprune_videos_done", "videos whose every segment finished").inc(
                count, self.tags)
