"""The annotator: a stateful Ray Data callable class that runs a model with a pruning method
over segments of videos and writes each segment's results.

``__init__`` builds the model and its :class:`models.StreamRunner` once. ``__call__`` takes a
batch of manifest rows (``resources.streams_per_actor`` segments) and runs them side by side:
one decoder per segment, one runner state for all of them, frame ``t`` of every live segment
stepped together; a segment that ends or fails leaves the batch (``runner.select``) while the
others go on. Then, per segment, the annotations and last the one-row stats file (its
completion marker) are written through the ``writer`` the pipeline passed in.

Failures of a video (unreadable, corrupt, decoder error) become the segment's ``status`` and
``error``; they never raise. A write that fails raises, so a segment is never marked done
without its results.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .decode import Frame, SegmentDecoder, clean_error, sampled_indices, sampling_ratio

PROGRESS_COLUMNS = ("segment_id", "video_id", "status", "frames_decoded", "gmacs_dense",
                    "gmacs_run")


def load_model(model: dict[str, Any], checkpoint_fs: Any = None):
    """Build the model a job names: a zoo entry, or an architecture with its checkpoint
    (opened through ``checkpoint_fs``, an fsspec filesystem, unless it is a local path)."""
    from models import build_model
    from models.checkpoints import load_into

    if model.get("name"):
        net = build_model(model["name"])
    else:
        options = dict(model.get("options") or {})
        if model.get("labels"):
            options["class_names"] = list(model["labels"])
        net = build_model(arch=model["arch"], **options)
        checkpoint = model["checkpoint"]
        if checkpoint_fs is None:
            load_into(net, checkpoint)
        else:
            with checkpoint_fs.open(checkpoint, "rb") as f:
                load_into(net, f, name=checkpoint)
        net.eval()
    if model.get("clip_frames"):
        frames = int(model["clip_frames"])
        tubelet = int(getattr(net, "tubelet", 0) or getattr(net.backbone, "tubelet", 1))
        if frames % tubelet:  # the model would drop the frames of the unfinished tubelet
            raise ValueError(f"decode.clip_frames {frames} is not a multiple of the model's "
                             f"tubelet ({tubelet} frames)")
        net.clip_frames = frames
        if hasattr(net, "clip_steps"):  # ViViT: its temporal model's steps follow
            net.clip_steps = frames // tubelet
    return net


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def build_runner(model: dict[str, Any], method: str, params: dict[str, Any],
                 checkpoint_fs: Any = None, device: str = "cpu"):
    """The model and method of a job, ready to step streams."""
    from models import StreamRunner, build_method

    net = load_model(model, checkpoint_fs)
    return StreamRunner(net, build_method(method, **params), device=device,
                        dtype=resolve_dtype(model.get("dtype", "auto"), device),
                        score_threshold=float(model.get("score_threshold", 0.3)),
                        input_size=model.get("input_size"))


def model_label(model: dict[str, Any]) -> str:
    """How a model is named in output rows: the zoo name, or arch@checkpoint-file."""
    if model.get("name"):
        return model["name"]
    return f"{model['arch']}@{posixpath.basename(str(model['checkpoint']).rstrip('/'))}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _Stream:
    """One segment being processed: its decoder, what it produced and what it cost."""

    row: dict[str, Any]
    decoder: SegmentDecoder
    started_at: datetime
    steps: list[tuple[int, float]] = field(default_factory=list)  # (frame index, ts) per step
    columns: dict[str, list] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    first_cost: tuple[float, float] | None = None
    model_s: float = 0.0
    error: str | None = None
    finished_at: datetime | None = None


class AnnotatorActor:
    """Ray Data callable class (see the module docstring).

    ``model``: the job's model section plus ``clip_frames`` (plain dict); ``method`` and
    ``params``: the pruning method; ``decode``: ``fps`` and ``frame_stride``; ``input_fs``:
    the fsspec filesystem of the videos; ``checkpoint_fs``: the one of the checkpoint (None:
    a local path); ``writer``: an object with ``write(segment_id, annotation_columns,
    stats_row)``; ``job``: ``job_id`` and ``fingerprint``; ``cpus``: the CPUs reserved for
    the actor (torch's thread count); ``progress``: the job's frame counter
    (``operators/progress.py``; None: no live count) and how often to report to it.
    """

    def __init__(self, model: dict[str, Any], method: str, params: dict[str, Any],
                 decode: dict[str, Any], input_fs: Any, writer: Any, job: dict[str, Any],
                 checkpoint_fs: Any = None, use_gpu: bool = False, cpus: float | None = None,
                 progress: Any = None, progress_every_s: float = 2.0):
        import torch

        from .progress import FrameReporter

        if cpus:
            # As many intra-op threads as CPUs reserved: more only contend (a tiny model ran
            # 40x slower with 2 threads than with 1 on a busy 2-core machine).
            torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.runner = build_runner(model, method, params, checkpoint_fs, self.device)
        self.task = self.runner.task
        self.class_names = list(self.runner.model.class_names)
        self.top_k = int(model.get("top_k", 5))
        self.fps = decode.get("fps")
        # How long a decoder may go without progress, how often it is replaced after a
        # crash or hang, and what decodes in it (``operators/decode.py``).
        self.decoder_options = {k: decode[k] for k in ("timeout_s", "retries", "backend")
                                if decode.get(k) is not None}
        self.frame_stride = int(decode.get("frame_stride", 1)) if self.task == "recognition" \
            else 1
        self.input_fs = input_fs
        self.writer = writer
        self.job = job
        self.device_name = self.device if self.device == "cpu" else \
            f"cuda ({torch.cuda.get_device_name(torch.cuda.current_device())})"
        self.node_id, self.actor_id = _ray_identity()
        from .metrics import JobMetrics

        self.metrics = JobMetrics(job.get("name", "-"), model_label(model), method)
        self.progress = FrameReporter(progress, progress_every_s)

    # -- Ray Data entry point -------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["segment_id"])
        rows = [{k: _plain(v[i]) for k, v in batch.items()} for i in range(n)]
        stats = self.process(rows)
        return {k: np.array([s[k] for s in stats]) for k in PROGRESS_COLUMNS}

    # -- the work ----------------------------------------------------------------------------
    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the segments ``rows`` (manifest rows) side by side; write and return their
        stats rows."""
        started = _now()
        streams = []
        for row in rows:
            ratio = sampling_ratio(row["fps"], self.fps, self.frame_stride)
            indices = sampled_indices(int(row["start_frame"]), int(row["end_frame"]), ratio)
            decoder = SegmentDecoder(self.input_fs, row["uri"], indices,
                                     size_bytes=int(row["size_bytes"]), **self.decoder_options)
            streams.append(_Stream(row, decoder, started,
                                   columns={c: [] for c in self._annotation_columns()}))
        try:
            self._run(streams)
        finally:
            self.progress.flush()
        out = []
        for s in streams:
            stats = self._stats(s)
            self.writer.write(s.row["segment_id"], s.columns, stats)
            self.metrics.segment_done(stats)
            out.append(stats)
        return out

    def _run(self, streams: list[_Stream]) -> None:
        live = list(streams)
        state = self.runner.new_state(len(live))
        while live:
            frames: list[Frame | None] = [s.decoder.read() for s in live]
            ended = [j for j, f in enumerate(frames) if f is None]
            if ended:
                t0 = time.perf_counter()
                try:
                    outs = self.runner.finish(state, ended)  # a recognizer's last clip
                except Exception as exc:
                    self._model_failed([live[j] for j in ended], exc)
                    outs = []
                share = (time.perf_counter() - t0) / len(ended)
                for j, out in zip(ended, outs):
                    live[j].model_s += share
                    self._consume(live[j], out, None)
                for j in ended:
                    live[j].finished_at = _now()
                keep = [j for j in range(len(live)) if j not in ended]
                if not keep:
                    return
                state = self.runner.select(state, keep)
                live = [live[j] for j in keep]
                frames = [frames[j] for j in keep]
            t0 = time.perf_counter()
            try:
                outs = self.runner.step([f.rgb for f in frames], state)
            except Exception as exc:  # the batch's model state is gone: end every stream in it
                self._model_failed(live, exc)
                for s in live:
                    s.decoder.close()
                    s.finished_at = _now()
                return
            share = (time.perf_counter() - t0) / len(live)
            self.progress.add(len(live))
            for s, f, out in zip(live, frames, outs):
                s.model_s += share
                s.steps.append((f.index, f.timestamp_s))
                self._consume(s, out, f)

    def _model_failed(self, streams: list[_Stream], exc: Exception) -> None:
        print(f"vidprune annotator: model failed on {len(streams)} segment(s):\n"
              f"{traceback.format_exc()}", file=sys.stderr)
        for s in streams:
            s.error = f"model error: {clean_error(exc)}"

    def _consume(self, s: _Stream, out: Any, frame: Frame | None) -> None:
        for key in ("gmacs_dense", "gmacs_run", "gmacs_overhead", "gmacs_padding",
                    "tokens_dense", "tokens_run"):
            s.cost[key] = s.cost.get(key, 0.0) + float(getattr(out, key))
        if s.first_cost is None and out.gmacs_dense > 0:
            s.first_cost = (float(out.gmacs_dense), float(out.gmacs_run))
        row = s.row
        if self.task == "detection":
            det = out.detections
            if det is None or frame is None or len(det.scores) == 0:
                return
            k = len(det.scores)
            boxes = det.boxes.numpy()
            labels = det.labels.numpy().astype(int)
            c = s.columns
            c["video_id"] += [row["video_id"]] * k
            c["uri"] += [row["uri"]] * k
            c["segment_id"] += [row["segment_id"]] * k
            c["frame_index"] += [frame.index] * k
            c["timestamp_s"] += [frame.timestamp_s] * k
            c["label"] += [self._label(i) for i in labels]
            c["label_id"] += labels.tolist()
            c["score"] += det.scores.numpy().tolist()
            for j, name in enumerate(("x0", "y0", "x1", "y1")):
                c[name] += boxes[:, j].tolist()
        else:
            for clip in out.clips:
                first_index, first_ts = s.steps[clip.first_step]
                last_step = min(clip.last_step, len(s.steps) - 1)
                last_index, last_ts = s.steps[last_step]
                frames = last_step - clip.first_step + 1
                fps = float(row["fps"]) or 0.0
                end_ts = last_ts + (1.0 / fps if fps else 0.0)
                probs = clip.probs.float()
                k = min(self.top_k, probs.numel())
                scores, labels = probs.topk(k)
                c = s.columns
                for rank, (score, label) in enumerate(zip(scores.tolist(), labels.tolist()), 1):
                    c["video_id"].append(row["video_id"])
                    c["uri"].append(row["uri"])
                    c["segment_id"].append(row["segment_id"])
                    c["clip_start_s"].append(first_ts)
                    c["clip_end_s"].append(end_ts)
                    c["first_frame"].append(first_index)
                    c["last_frame"].append(last_index)
                    c["frames"].append(frames)
                    c["rank"].append(rank)
                    c["label"].append(self._label(label))
                    c["label_id"].append(int(label))
                    c["score"].append(float(score))

    def _label(self, i: int) -> str:
        return self.class_names[i] if 0 <= i < len(self.class_names) else str(i)

    def _annotation_columns(self) -> tuple[str, ...]:
        if self.task == "detection":
            return ("video_id", "uri", "segment_id", "frame_index", "timestamp_s", "label",
                    "label_id", "score", "x0", "y0", "x1", "y1")
        return ("video_id", "uri", "segment_id", "clip_start_s", "clip_end_s", "first_frame",
                "last_frame", "frames", "rank", "label", "label_id", "score")

    def _stats(self, s: _Stream) -> dict[str, Any]:
        d = s.decoder
        error = s.error or d.error
        expected = len(d.indices)
        if error is None and d.frames_decoded < expected:  # defensive: never claim "ok"
            error = f"decoded {d.frames_decoded} of {expected} frames"
        # the frames the model ran (after a model error, fewer than were decoded)
        decoded = [i for i, _ in s.steps]
        status = "ok" if error is None else ("partial" if decoded else "error")
        finished = s.finished_at or _now()
        row = s.row
        first_dense, first_run = s.first_cost or (0.0, 0.0)
        return {
            "segment_id": row["segment_id"], "video_id": row["video_id"], "uri": row["uri"],
            "segment_index": int(row["segment_index"]),
            "segments_total": int(row["segments_total"]),
            "start_frame": int(row["start_frame"]), "end_frame": int(row["end_frame"]),
            "status": status, "error": error,
            "frames_expected": expected, "frames_decoded": len(decoded),
            "first_frame": decoded[0] if decoded else None,
            "last_frame": decoded[-1] if decoded else None,
            "annotations": len(s.columns["video_id"]),
            "gmacs_dense": s.cost.get("gmacs_dense", 0.0), "gmacs_run": s.cost.get("gmacs_run", 0.0),
            "gmacs_overhead": s.cost.get("gmacs_overhead", 0.0),
            "gmacs_padding": s.cost.get("gmacs_padding", 0.0),
            "gmacs_dense_first": first_dense, "gmacs_run_first": first_run,
            "tokens_dense": s.cost.get("tokens_dense", 0.0),
            "tokens_run": s.cost.get("tokens_run", 0.0),
            "decode_s": d.decode_s, "model_s": s.model_s,
            "wall_s": (finished - s.started_at).total_seconds(),
            "node_id": self.node_id, "actor_id": self.actor_id, "device": self.device_name,
            "started_at": s.started_at, "finished_at": finished,
            "job_id": self.job["job_id"], "fingerprint": self.job["fingerprint"],
        }


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _ray_identity() -> tuple[str, str]:
    """This worker's Ray node and actor ids ("local" outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return ctx.get_node_id() or "local", ctx.get_actor_id() or "local"
    except Exception:
        pass
    return "local", "local"


def params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)
