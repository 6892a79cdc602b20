"""A job from spec to outputs: plan (every check, nothing written), then run.

:func:`plan_job` checks everything that can be checked before anything is written: the
output location against the output mode, the model (built once on the driver, weights
loaded, the method checked against it) and the input listing. A problem there raises
:class:`JobRefused` (the CLI exits with code 2). :func:`run_job` then writes ``job.json``,
probes the videos, writes the manifest, runs the segments still to do on Ray Data, and
aggregates one row per video.

Resume: a segment is skipped when its completion marker ``segments/<segment_id>.parquet``
exists. Segment ids include the job fingerprint and the video's content identity, and a
resumed job must have the fingerprint recorded in the output's ``job.json``, so a skipped
segment was produced by the same model, method, parameters and decode settings from the
same version of the video. Files of segments that are not in the current manifest (a video
that changed or disappeared) are removed, so the output holds every video exactly once.

The job spec is passed in as an object with the sections of ``jobs.spec.JobSpec``
(``pipeline`` does not import ``jobs``).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from operators.retry import give_up_when_unreachable, retry

from .graph import Resources, run_segments
from .listing import VideoObject, list_videos, probe_videos, probe_videos_on_cluster
from .lock import LOCK_DIR, LockLost, OutputLock, OutputLocked
from .manifest import build_manifest, fingerprint
from .outputs import (ANNOTATIONS, JOB_FILE, KNOWN_ENTRIES, MANIFEST_FILE, SEGMENTS_DIR,
                      VIDEOS_FILE, SegmentWriter, completed_segments, read_manifest,
                      read_segments)
from .results import aggregate_videos, format_summary, totals
from .storage import (Location, StorageError, filesystem, identity, is_local, local_write_problem,
                      parquet_bytes, s3_bucket_problem, write_problem)

Log = Callable[[str], None]


class JobRefused(Exception):
    """The job cannot start (found before anything was written). ``key`` is the spec key
    the problem is about, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Plan:
    """Everything decided before a job writes anything."""

    spec: Any
    job_id: str
    task: str
    model: dict[str, Any]            # the model section as the annotator takes it
    model_label: str
    method: str
    params: dict[str, Any]           # the method's full parameters (defaults filled in)
    fingerprint: str
    fingerprint_inputs: dict[str, Any]
    input_fs: Any
    checkpoint_fs: Any               # None: local checkpoint (or a zoo model)
    output: Location
    videos: list[VideoObject]
    previous: dict[str, Any] | None  # the output's job.json (resume)
    model_size: Any = None           # memory.ModelSize: what the actors' memory depends on
    progress_every_s: float = 5.0    # progress lines at most this often


@dataclass
class JobResult:
    job_id: str
    output_uri: str
    status: str                      # finished | failed
    totals: dict[str, Any]
    segments_total: int
    segments_skipped: int
    segments_run: int
    wall_s: float
    summary: str
    videos: pa.Table | None = None
    processed: list[str] = field(default_factory=list)  # segment ids run by this call


# -- planning -------------------------------------------------------------------------------

def plan_job(spec: Any, log: Log = _stderr) -> Plan:
    """Everything checked, nothing written. Someone is waiting for this answer: an endpoint
    that never answered is given up after one attempt (``operators/retry.py``)."""
    with give_up_when_unreachable():
        return _plan_job(spec, log)


def _plan_job(spec: Any, log: Log) -> Plan:
    started = _now()
    job_id = f"{spec.name}-{started:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    output = _open_output(spec)
    model, checkpoint_fs, method, params, checkpoint_id, size = _check_model(spec)
    inputs = _fingerprint_inputs(spec, model, method, params, checkpoint_id)
    fp = fingerprint(inputs)
    previous = _check_output(spec, output, fp, inputs)
    input_fs, root = _input_filesystem(spec)
    try:
        videos = list_videos(input_fs, root, spec.input.patterns)
    except (StorageError, OSError) as exc:
        raise JobRefused(_storage_message(exc), "input.uri") from None
    if not videos:
        raise JobRefused(f"no videos under {spec.input.uri} match "
                         f"{', '.join(spec.input.patterns)}", "input.patterns")
    from operators.annotator import model_label

    return Plan(spec, job_id, model["task"], model, model_label(model), method, params, fp,
                inputs, input_fs, checkpoint_fs, output, videos, previous, size)


def _storage_message(exc: BaseException) -> str:
    from operators.redact import redact

    text = str(exc) or type(exc).__name__
    return redact(text.replace("\n", " "))[:500]


def _open_output(spec: Any) -> Location:
    try:
        return Location.open(spec.output.uri, **spec.output.storage.options())
    except (StorageError, OSError) as exc:
        raise JobRefused(_storage_message(exc), "output.uri") from None


def _input_filesystem(spec: Any) -> tuple[Any, str]:
    try:
        return filesystem(spec.input.uri, **spec.input.storage.options())
    except (StorageError, OSError) as exc:
        raise JobRefused(_storage_message(exc), "input.uri") from None


def _check_model(spec: Any):
    """Build the model and method once on the driver, as the actors will: a bad checkpoint,
    unknown architecture options or a method that cannot run on the model are found here,
    before anything is written."""
    from models import ModelError
    from models.checkpoints import CheckpointError
    from models.methods import MethodError
    from operators.annotator import build_runner

    model = spec.model_config_dict()
    checkpoint_fs, checkpoint_id = None, None
    if model.get("checkpoint"):
        fs, path = filesystem(model["checkpoint"], **spec.input.storage.options())
        try:
            info = fs.info(path) if is_local(fs) else retry(
                lambda: fs.info(path), f"looking up {model['checkpoint']}")
            checkpoint_id = identity(info)
        except FileNotFoundError:
            raise JobRefused(f"{model['checkpoint']} does not exist", "model.checkpoint") from None
        except OSError as exc:
            raise JobRefused(_storage_message(exc), "model.checkpoint") from None
        if not is_local(fs):
            checkpoint_fs = fs
    else:
        checkpoint_id = _zoo_identity(model["name"])
    try:
        runner = build_runner(model, spec.pruning.method, spec.pruning.params, checkpoint_fs)
    except MethodError as exc:
        raise JobRefused(str(exc), "pruning") from None
    except CheckpointError as exc:  # vidprune's own message, of bounded length: never cut
        from operators.redact import redact

        raise JobRefused(redact(" ".join(str(exc).split())), "model.checkpoint") from None
    except OSError as exc:
        raise JobRefused(_storage_message(exc), "model.checkpoint") from None
    except (ModelError, ValueError, TypeError) as exc:
        raise JobRefused(str(exc), "model") from None
    except Exception as exc:  # options that break the architecture in other ways
        raise JobRefused(f"the model cannot be built with these settings: "
                         f"{type(exc).__name__}: {_storage_message(exc)}", "model") from None
    params = runner.method.describe()
    model["clip_frames"] = getattr(runner.model, "clip_frames", None) or model.get("clip_frames")
    from .memory import model_size

    return (model, checkpoint_fs, spec.pruning.method, params, checkpoint_id,
            model_size(runner))


def _zoo_identity(name: str) -> str:
    from models import zoo_entries

    return zoo_entries()[name].identity()


def _fingerprint_inputs(spec: Any, model: dict[str, Any], method: str, params: dict[str, Any],
                        checkpoint_id: str | None) -> dict[str, Any]:
    """The settings that change results (see the module docstring)."""
    m = {k: model.get(k) for k in ("task", "name", "arch", "checkpoint", "options", "labels",
                                   "input_size", "score_threshold", "dtype", "top_k",
                                   "clip_frames")}
    m["checkpoint_identity"] = checkpoint_id
    decode = {"fps": spec.decode.fps, "segment_frames": spec.decode.segment_frames}
    if model["task"] == "recognition":
        decode["frame_stride"] = spec.decode.frame_stride
    if spec.decode.backend != "pyav":  # outputs of the default keep their fingerprint
        decode["backend"] = spec.decode.backend
    inputs = {"model": m, "pruning": {"method": method, "params": params}, "decode": decode}
    if model["task"] == "recognition":  # clips gained a `frames` column: files differ
        inputs["annotation_format"] = 2
    return inputs


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_output(spec: Any, output: Location, fp: str, inputs: dict[str, Any],
                  locked: bool = False) -> dict[str, Any] | None:
    """Apply the output mode; returns the earlier ``job.json`` when resuming. An output
    another job is writing is refused (``pipeline/lock.py``) unless this job holds the lock
    (``locked``)."""
    try:
        if output.fs.isfile(output.root):
            raise JobRefused(f"{spec.output.uri} is a file, not a folder", "output.uri")
        if not locked and is_local(output.fs):  # (reads only: a dry run writes nothing)
            _refuse_unwritable(spec, local_write_problem(output.root))
        listed = output.entries()
        entries = [e for e in listed if e != LOCK_DIR]
        if not listed and not locked and not is_local(output.fs):
            _refuse_unwritable(spec, s3_bucket_problem(output.fs, output.root))
        if LOCK_DIR in listed and not locked:
            OutputLock(output, "").check()
    except JobRefused:
        raise
    except OutputLocked as exc:
        raise JobRefused(str(exc), "output.uri") from None
    except OSError as exc:
        raise JobRefused(_storage_message(exc), "output.uri") from None
    if not entries:
        return None
    mode = spec.output.mode
    if mode == "error":
        raise JobRefused(f"{spec.output.uri} is not empty and output.mode is 'error'; use "
                         "mode 'resume' to continue that job, 'overwrite' to replace its "
                         "results, or another location", "output.uri")
    if JOB_FILE not in entries:
        raise JobRefused(f"{spec.output.uri} is not empty and holds no {JOB_FILE}: it does not "
                         "look like a vidprune output, so vidprune will not write into or "
                         "delete it; choose an empty location", "output.uri")
    if mode == "overwrite":
        return None
    try:
        previous = json.loads(output.read_bytes(JOB_FILE))
    except (OSError, ValueError) as exc:
        raise JobRefused(f"cannot read {output.uri_for(JOB_FILE)} to resume: {exc}",
                         "output.uri") from None
    if previous.get("fingerprint") != fp:
        before = _flatten(previous.get("fingerprint_inputs") or {})
        now = _flatten(inputs)
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        detail = (f" (differs in: {', '.join(changed)})" if changed else "")
        raise JobRefused(f"{spec.output.uri} holds results of a different job spec{detail}; "
                         "resuming would mix them. Use output.mode 'overwrite' to replace "
                         "them, or another output location", "output.mode")
    return previous


def _refuse_unwritable(spec: Any, problem: str | None) -> None:
    """Refuse an output that cannot be written (``problem``: why, found without writing, or
    at the job's first write, the lock's)."""
    if problem:
        hint = (", or give the job's credentials write access there"
                if problem == "access denied" else "")
        raise JobRefused(f"cannot write to {spec.output.uri}: {problem}; choose another output "
                         f"location{hint}", "output.uri")


# -- running --------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("vidprune", "torch", "ray", "av", "decord", "pyarrow", "fsspec", "s3fs",
                 "pydantic", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "source" if dist == "vidprune" else "not installed"
    return out


class Progress:
    """Videos done / total, frames and running savings, printed as segments finish and, while
    segments run, every ``every_s`` seconds in which frames were run (``tick``). ``live``:
    frames run so far by the actors, unfinished segments included (``operators/progress.py``;
    None or failing: the frames of finished segments)."""

    #: With nothing moving, a line at least this often (the job is alive).
    QUIET_S = 60.0

    def __init__(self, manifest: pa.Table, pending_ids: set[str], log: Log,
                 every_s: float = 5.0, live: Callable[[], int] | None = None):
        self.log = log
        self.every_s = every_s
        self.live = live
        self._lock = threading.Lock()
        self.printed_frames = 0
        self.left: dict[str, int] = {}
        videos = set()
        for row in manifest.select(["video_id", "segment_id"]).to_pylist():
            videos.add(row["video_id"])
            if row["segment_id"] in pending_ids:
                self.left[row["video_id"]] = self.left.get(row["video_id"], 0) + 1
        self.total = len(videos)
        self.done = self.total - len(self.left)
        self.frames = 0
        self.dense = self.run = 0.0
        self.errors = 0
        self.t0 = time.monotonic()
        self.last = self.t0  # the first line when frames move, or after every_s

    def update(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._update(row)

    def tick(self) -> None:
        """A line if ``every_s`` passed since the last and frames were run meanwhile (or
        ``QUIET_S`` passed)."""
        with self._lock:
            now = time.monotonic()
            if now - self.last < self.every_s:
                return
            if self._frames() == self.printed_frames and now - self.last < self.QUIET_S:
                return
            self._print(now)

    def _frames(self) -> int:
        if self.live is not None:
            try:
                return max(self.frames, int(self.live()))
            except Exception:  # noqa: BLE001 - a lost counter: finished segments only
                self.live = None
        return self.frames

    def _update(self, row: dict[str, Any]) -> None:
        self.frames += int(row["frames_decoded"])
        self.dense += float(row["gmacs_dense"])
        self.run += float(row["gmacs_run"])
        self.errors += row["status"] != "ok"
        vid = row["video_id"]
        if vid in self.left:
            self.left[vid] -= 1
            if self.left[vid] <= 0:
                del self.left[vid]
                self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every_s or not self.left:
            self._print(now)

    def _print(self, now: float) -> None:
        self.last = now
        frames = self.printed_frames = self._frames()
        # savings of the finished segments (none yet: not known, rather than 0 %)
        saved = f"{100 * (1 - self.run / self.dense):.1f}%" if self.dense else "-"
        self.log(f"progress: {self.done}/{self.total} videos · {frames:,d} frames · "
                 f"savings {saved} · {self.errors} segment(s) with errors · "
                 f"{now - self.t0:.0f} s")


def _frame_counter() -> Any:
    """The job's live frame counter (``operators/progress.py``), or None outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    from operators.progress import FrameCounter

    return ray.remote(num_cpus=0)(FrameCounter).remote()


def _reader(counter: Any) -> Callable[[], int] | None:
    if counter is None:
        return None
    import ray

    return lambda: ray.get(counter.get.remote(), timeout=5)


def _kill(counter: Any) -> None:
    if counter is not None:
        import ray

        try:
            ray.kill(counter)
        except Exception:  # noqa: BLE001 - gone already with its cluster
            pass


def _write_job_file(plan: Plan, doc: dict[str, Any]) -> None:
    plan.output.write_bytes(JOB_FILE, json.dumps(doc, indent=2, default=str).encode())


def run_job(spec: Any, address: str | None = None, log: Log = _stderr) -> JobResult:
    """Plan and run a job (see the module docstring)."""
    plan = plan_job(spec, log)
    from . import cluster

    started_ray = cluster.connect(address)
    try:
        if spec.resources.gpus_per_actor > 0 and cluster.cluster_gpus() == 0:
            raise JobRefused("the Ray cluster has no GPUs; set resources.gpus_per_actor=0 "
                             "to run on CPUs", "resources.gpus_per_actor")
        # an actor no node can hold would wait for one forever (Ray only logs it)
        for key, resource, noun in (("cpus_per_actor", "CPU", "CPUs"),
                                    ("gpus_per_actor", "GPU", "GPUs")):
            wanted = getattr(spec.resources, key)
            largest = max(cluster.node_resource(resource), default=0.0)
            if wanted > largest > 0:  # (none at all: an autoscaler's empty head, say)
                raise JobRefused(f"{wanted:g} {noun} per actor, but the largest node of the "
                                 f"Ray cluster has {largest:g} {noun}; lower "
                                 f"resources.{key}, or start a larger node first",
                                 f"resources.{key}")
        wanted = spec.resources.memory_per_actor_gib
        largest = max(cluster.node_memory_bytes(), default=0.0)
        if wanted and largest and wanted * 2 ** 30 > largest:
            raise JobRefused(f"{wanted:g} GiB per actor, but the largest node of the Ray "
                             f"cluster has {largest / 2 ** 30:.1f} GiB of memory for actors",
                             "resources.memory_per_actor_gib")
        return execute(plan, log)
    finally:
        if started_ray:
            cluster.shutdown()


def execute(plan: Plan, log: Log = _stderr) -> JobResult:
    """Run a planned job: the first call that writes to the output. The job holds the
    output's lock (``pipeline/lock.py``) from here to its end."""
    lock = OutputLock(plan.output, plan.job_id, log=log)
    try:
        lock.acquire()
    except OutputLocked as exc:
        raise JobRefused(str(exc), "output.uri") from None
    except (FileNotFoundError, PermissionError, NotADirectoryError, FileExistsError) as exc:
        # the first write: denied access, a missing bucket, a folder that cannot be made
        _refuse_unwritable(plan.spec, write_problem(exc, plan.output.fs,
                                                    plan.output.path(LOCK_DIR, "x")))
        raise
    except OSError as exc:
        raise JobRefused(f"cannot lock the output: {_storage_message(exc)}",
                         "output.uri") from None
    try:
        # What the output holds may have changed since planning: decide again, under the lock.
        plan.previous = _check_output(plan.spec, plan.output, plan.fingerprint,
                                      plan.fingerprint_inputs, locked=True)
        return _execute(plan, lock, log)
    finally:
        lock.release()


def _execute(plan: Plan, lock: OutputLock, log: Log) -> JobResult:
    spec, out = plan.spec, plan.output
    t0 = time.monotonic()
    started = _now()
    if spec.output.mode == "overwrite":
        for name in KNOWN_ENTRIES:
            out.remove(name)
    runs = list((plan.previous or {}).get("previous_runs", []))
    if plan.previous:
        runs.append({k: plan.previous.get(k) for k in ("job_id", "status", "started_at",
                                                        "finished_at")})
    doc: dict[str, Any] = {
        "job_id": plan.job_id, "name": spec.name, "status": "running", "error": None,
        "started_at": started.isoformat(), "finished_at": None,
        "spec": spec.as_dict(), "model": plan.model_label, "method": plan.method,
        "params": plan.params, "fingerprint": plan.fingerprint,
        "fingerprint_inputs": plan.fingerprint_inputs, "versions": versions(),
        "previous_runs": runs,
    }
    _write_job_file(plan, doc)

    known = _earlier_probes(out) if plan.previous else {}
    log(f"{spec.name}: probing {len(plan.videos)} video(s) under {spec.input.uri}"
        + (f" ({sum((v.uri, v.identity) in known for v in plan.videos)} known from the "
           "earlier run)" if known else ""))
    probes = _probe(plan, known, log)
    manifest = build_manifest(probes, spec.decode.segment_frames, plan.fingerprint,
                              fps=spec.decode.fps,
                              frame_stride=spec.decode.frame_stride
                              if plan.task == "recognition" else 1)
    out.write_bytes(MANIFEST_FILE, parquet_bytes(manifest))
    ids = set(manifest.column("segment_id").to_pylist())
    _remove_stale(out, ids)
    done = completed_segments(out) & ids
    runnable = manifest.filter(pc.is_null(manifest.column("probe_error")))
    pending_mask = [sid not in done for sid in runnable.column("segment_id").to_pylist()]
    pending = runnable.filter(pa.array(pending_mask, type=pa.bool_()))
    skipped = runnable.num_rows - pending.num_rows
    log(f"{spec.name}: {manifest.num_rows} segment(s) of {len(plan.videos)} video(s); "
        f"{skipped} already complete, {pending.num_rows} to run on {spec.resources.actors} "
        f"actor(s)")

    error: BaseException | None = None
    counter = _frame_counter()
    progress = Progress(manifest, set(pending.column("segment_id").to_pylist()), log,
                        every_s=plan.progress_every_s, live=_reader(counter))
    actor_kwargs = {
        "progress": counter, "progress_every_s": min(2.0, plan.progress_every_s),
        "model": plan.model, "method": plan.method, "params": plan.params,
        "decode": {"fps": spec.decode.fps, "frame_stride": spec.decode.frame_stride,
                   "timeout_s": spec.decode.timeout_s, "retries": spec.decode.retries,
                   "backend": spec.decode.backend},
        "input_fs": plan.input_fs, "writer": SegmentWriter(out, plan.task),
        "job": {"job_id": plan.job_id, "fingerprint": plan.fingerprint, "name": spec.name},
        "checkpoint_fs": plan.checkpoint_fs,
    }
    r = spec.resources
    from .memory import actor_resources

    actors, memory_bytes = actor_resources(spec.name, r, plan.model_size, plan.method,
                                           manifest, log, spec.decode.backend)
    from operators.metrics import JobMetrics

    metrics = JobMetrics(spec.name, plan.model_label, plan.method)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(plan.progress_every_s):
            progress.tick()

    ticker = threading.Thread(target=tick, name="vidprune-progress", daemon=True)
    ticker.start()
    try:
        for row in run_segments(pending, actor_kwargs, Resources(
                actors, r.gpus_per_actor, r.cpus_per_actor, r.streams_per_actor,
                memory_bytes)):
            done = progress.done
            progress.update(row)
            metrics.videos_done(progress.done - done)
            lock.ensure()
    except BaseException as exc:  # recorded in job.json, then raised again below
        error = exc
    finally:
        stop.set()
        ticker.join()
        _kill(counter)
    if isinstance(error, LockLost):  # the output is another job's now: write nothing more
        raise error

    complete = sorted(completed_segments(out) & ids)
    segments = read_segments(out, complete)
    # what this run completed, from the rows it wrote: after an interrupt, actors finish the
    # segments they hold, whose rows never reach the driver
    processed = sorted(r["segment_id"] for r in segments.select(["segment_id", "job_id"])
                       .to_pylist() if r["job_id"] == plan.job_id)
    job_info = {"task": plan.task, "model": plan.model_label, "method": plan.method,
                "params": json.dumps(plan.params, sort_keys=True, default=str),
                "job_id": plan.job_id}
    videos = aggregate_videos(manifest, segments, job_info)
    out.write_bytes(VIDEOS_FILE, parquet_bytes(videos))
    t = totals(videos)
    wall_s = time.monotonic() - t0
    status = "finished" if error is None else (
        "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
    doc.update({
        "status": status, "error": None if error is None else (
            (str(error) or "interrupted (SIGINT, Ctrl-C)")
            if isinstance(error, KeyboardInterrupt) else _storage_message(error)),
        "finished_at": _now().isoformat(), "wall_s": wall_s, "totals": t,
        "segments": {"total": runnable.num_rows, "skipped": skipped,
                     "run": len(processed), "unreadable_videos": manifest.num_rows
                     - runnable.num_rows},
    })
    _write_job_file(plan, doc)
    if error is not None:
        raise error
    problems = [(v["uri"], v["error"]) for v in videos.to_pylist() if v["status"] != "ok"]
    return JobResult(plan.job_id, spec.output.uri, status, t, runnable.num_rows, skipped,
                     len(processed), wall_s, format_summary(t, wall_s, spec.output.uri,
                                                            problems),
                     videos, processed)


def _earlier_probes(out: Location) -> dict[tuple[str, str], dict[str, Any]]:
    """What the earlier run's manifest says about each video (uri, identity), so that a
    resumed job does not open every unchanged video again. Failed probes are not reused:
    they may have been transient."""
    try:
        manifest = read_manifest(out)
    except (OSError, ValueError, pa.ArrowException):
        return {}
    known = {}
    for row in manifest.to_pylist():
        if not row["probe_error"]:
            known[(row["uri"], row["identity"])] = {
                k: row.get(k) for k in ("frames_total", "fps", "width", "height", "duration_s",
                                        "probe_warning")}
    return known


def _remove_stale(out: Location, ids: set[str]) -> None:
    """Drop results of segments that are not in this manifest (videos that changed or left
    the input since an earlier run), so every video appears exactly once."""
    for folder in (ANNOTATIONS, SEGMENTS_DIR):
        stale = [n for n in out.files(folder)
                 if not (n.endswith(".parquet") and n[:-len(".parquet")] in ids)]
        out.remove_files(folder, stale)


CLUSTER_PROBE_MIN_VIDEOS = 32


def _probe_workers() -> int:
    return min(16, (os.cpu_count() or 2) * 2)


def _probe(plan: Plan, known: dict[tuple[str, str], dict[str, Any]], log: Log
           ) -> list[dict[str, Any]]:
    """Probe on the driver, or spread over the nodes of a multi-node cluster."""
    from . import cluster

    nodes = cluster.alive_nodes()
    unknown = sum((v.uri, v.identity) not in known for v in plan.videos)
    # A task costs a worker process start; for a handful of videos the driver is quicker.
    if nodes > 1 and unknown >= CLUSTER_PROBE_MIN_VIDEOS:
        log(f"{plan.spec.name}: probing {unknown} video(s) in Ray tasks across {nodes} nodes")
        return probe_videos_on_cluster(plan.input_fs, plan.videos, nodes, known=known,
                                       timeout_s=plan.spec.decode.timeout_s)
    return probe_videos(plan.input_fs, plan.videos, workers=_probe_workers(), known=known,
                        timeout_s=plan.spec.decode.timeout_s)
