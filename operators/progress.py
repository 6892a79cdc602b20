"""Frames run so far, reported by the annotator actors while their segments run.

A segment of a long video takes minutes (``decode.segment_frames`` frames); the driver only
learns of it when it ends. So each actor adds the frames it has run to one small Ray actor
per job, at most every few seconds and at the end of every call, without waiting for an
answer, and the driver reads the count for its progress lines (``pipeline.job.Progress``).
Retried work is counted again: the outputs, not this count, are the record.
"""

from __future__ import annotations

import time
from typing import Any


class FrameCounter:
    """The job's running count (a Ray actor of no CPU, made by the driver)."""

    def __init__(self) -> None:
        self.frames = 0

    def add(self, frames: int) -> None:
        self.frames += int(frames)

    def get(self) -> int:
        return self.frames


class FrameReporter:
    """An actor's side: counts frames and sends them to the counter at most every
    ``every_s`` seconds (``flush`` sends the rest). ``counter`` None: counts nothing."""

    def __init__(self, counter: Any = None, every_s: float = 2.0) -> None:
        self.counter = counter
        self.every_s = every_s
        self.pending = 0
        self.last = time.monotonic()

    def add(self, frames: int) -> None:
        if self.counter is None:
            return
        self.pending += frames
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.counter is None or not self.pending:
            return
        try:
            self.counter.add.remote(self.pending)  # no wait: progress never slows the work
        except Exception:  # noqa: BLE001 - a lost counter costs progress lines, not results
            self.counter = None
        self.pending = 0
        self.last = time.monotonic()
