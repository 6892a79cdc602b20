"""The Ray Data graph of a job: segments in, one stateful annotator per actor, progress out.

The segments to run (the manifest rows still to do, longest first) become a dataset with one
block per actor call (``streams_per_actor`` rows): an actor pool dispatches whole blocks, so
blocks of that size spread the work evenly over the actors, and blocks are dispatched in the
order given, which keeps the longest segments first. (``preserve_order`` is left off: it
would only order the *outputs*, holding progress reports back behind the longest segment.)

Each actor writes its segments' results itself (see ``pipeline/outputs.py``); what flows back
to the driver is one small progress row per segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from operators.annotator import AnnotatorActor


@dataclass(frozen=True)
class Resources:
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    streams_per_actor: int = 1
    memory_bytes: int | None = None  # Ray's memory= for each actor (pipeline/memory.py)


def segment_dataset(pending: pa.Table, streams_per_actor: int):
    """One block per ``streams_per_actor`` segments, in the order of ``pending``."""
    import ray.data

    k = max(1, int(streams_per_actor))
    blocks = [pending.slice(start, k) for start in range(0, pending.num_rows, k)]
    return ray.data.from_arrow(blocks)


def run_segments(pending: pa.Table, actor_kwargs: dict[str, Any], resources: Resources
                 ) -> Iterator[dict[str, Any]]:
    """Run the annotator over ``pending`` (manifest rows); yield one progress row per
    segment as segments finish (see ``operators.annotator.PROGRESS_COLUMNS``)."""
    import ray.data

    if pending.num_rows == 0:
        return
    # vidprune prints its own progress (videos, frames, savings); Ray Data's progress
    # bars would interleave a dozen lines per update with it on a terminal or in a log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    _quiet_ray_data_console()
    k = max(1, int(resources.streams_per_actor))
    calls = math.ceil(pending.num_rows / k)
    size = max(1, min(int(resources.actors), calls))
    ds = segment_dataset(pending, k).map_batches(
        AnnotatorActor,
        # One call queued per actor: segments are long, and calls queued behind a busy actor
        # while another sits idle would make stragglers at the end of a job.
        compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
        batch_size=k,
        batch_format="numpy",
        num_gpus=resources.gpus_per_actor or None,
        num_cpus=resources.cpus_per_actor,
        memory=resources.memory_bytes or None,
        fn_constructor_kwargs={**actor_kwargs, "use_gpu": resources.gpus_per_actor > 0,
                               "cpus": resources.cpus_per_actor},
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["segment_id"])
        for i in range(n):
            yield {key: _plain(values[i]) for key, values in batch.items()}


def _quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (execution plan, start, finish) and its note that progress bars
    are off (vidprune turned them off) leave the console; its log files keep everything."""
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "stream", None) is not None and handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: "Progress bars disabled" not in record.getMessage())


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value

