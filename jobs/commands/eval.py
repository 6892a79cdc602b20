"""``vidprune eval``: accuracy against compute, dense and every pruning method, on a split of
the generated benchmark.

Every video of the split is run through ``models.StreamRunner`` (frames in order, several
videos side by side as streams), once densely and once per method and operating point. Per
setting it records the accuracy (``map50`` for detection, ``top1`` for recognition), the
agreement with the dense model's own outputs (detection: mAP50 of the method's detections
against the dense detections above the runner's default score threshold taken as ground
truth, NaN when the dense model found nothing; recognition: the share of videos whose predicted class equals the dense prediction),
and the executed backbone GMACs per frame averaged over all frames, first frames and refresh
frames included (and, beside it, without each video's first frame).

Writes ``OUT/results.parquet``, ``OUT/results.md`` and ``OUT/accuracy_vs_gmacs.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

#: Operating points per method (parameters as the method's ``Params`` names them), scaled
#: from the papers' to the zoo models' token counts. Detector: a 16 x 16 grid (192 tokens on
#: pixels for 4:3 video); eventful's r = 1024 of 4096 tokens (25 %) becomes 64 of 256, rollout's
#: K = 750 of 4096 (18 %) becomes 48. Recognizer: 8 slices of 7 x 7 tubelets; STA's r = 48 of
#: 196 per slice becomes 12 of 49. ``--grid`` replaces a method's entry.
DEFAULT_GRIDS: dict[str, list[dict[str, Any]]] = {
    "eventful": [{"r": r} for r in (32, 64, 96)],
    "stgt": [{"r": r} for r in (32, 64, 96)],
    "rollout": [{"k": k} for k in (48, 64, 96)],
    "sta": [{"r": r} for r in (6, 12, 18, 24)],
    "svit": [{}],
}
#: The score a dense detection needs to count as a reference object for ``agreement``.
AGREEMENT_SCORE = 0.3
#: Detections kept for mAP (the full precision-recall curve needs low-score detections).
EVAL_SCORE = 0.05

RESULT_COLUMNS = ("task", "model", "method", "setting", "metric", "value", "agreement",
                  "gmacs_per_frame", "savings", "gmacs_dense_per_frame",
                  "gmacs_overhead_per_frame", "gmacs_per_frame_after_first",
                  "gmacs_padding_per_frame", "frames",
                  "videos", "split", "wall_s")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="accuracy against compute: dense and every method on the benchmark",
        description="Run the task's zoo models densely and with every registered pruning method "
                    "that applies, over a grid of operating points, on a split of the "
                    "generated benchmark; write results.parquet, results.md and a plot.")
    p.add_argument("--task", choices=("detection", "recognition"), required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default="runs/synth",
                   help="the --out folder of `vidprune generate` (default runs/synth)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split to evaluate (default test; use val for choices)")
    p.add_argument("--model", action="append", default=None,
                   help="zoo model (repeatable; default: every zoo model of the task)")
    p.add_argument("--zoo-dir", help="read zoo models from this folder instead of models/zoo")
    p.add_argument("--methods", nargs="+", help="methods to run (default: all registered)")
    p.add_argument("--grid", action="append", default=[], metavar="METHOD:KEY=V1,V2[:KEY=...]",
                   help="operating points of a method, e.g. eventful:r=32,64 (repeatable; "
                        "several keys give their product)")
    p.add_argument("--streams", type=int, default=4, help="videos run side by side (default 4)")
    p.add_argument("--limit", type=int, help="evaluate only the first N videos")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run)


# --- running a model over a split -----------------------------------------------------------

@dataclass
class RunOutput:
    """Predictions and costs of one model + method over the videos of a split."""

    detections: list[list[Any]] = field(default_factory=list)   # per video, per frame
    probs: list[Any] = field(default_factory=list)              # per video, mean clip probs
    frames: int = 0
    videos: int = 0
    gmacs_run: float = 0.0
    gmacs_dense: float = 0.0
    gmacs_overhead: float = 0.0
    gmacs_padding: float = 0.0  # on padding rows of ragged streams (outside gmacs_run)
    gmacs_first: float = 0.0    # gmacs_run of each video's first frame (frame models)
    wall_s: float = 0.0


def run_streams(runner, videos: list, streams: int, read) -> RunOutput:
    """Run ``runner`` over ``videos`` (each read into frames by ``read(video)``), ``streams``
    at a time in lockstep; a video that ends leaves its batch."""
    import torch

    out = RunOutput()
    t0 = time.time()
    for start in range(0, len(videos), streams):
        group = videos[start:start + streams]
        pixels = [read(v) for v in group]
        lengths = [len(p) for p in pixels]
        state = runner.new_state(len(group))
        active = list(range(len(group)))
        dets: list[list[Any]] = [[] for _ in group]
        clip_probs: list[list[Any]] = [[] for _ in group]
        for t in range(max(lengths)):
            ended = [j for j, i in enumerate(active) if lengths[i] <= t]
            if ended:
                for j, o in zip(ended, runner.finish(state, ended)):
                    clip_probs[active[j]].extend(c.probs for c in o.clips)
                keep = [j for j, i in enumerate(active) if lengths[i] > t]
                state = runner.select(state, keep)
                active = [active[j] for j in keep]
            outs = runner.step([pixels[i][t] for i in active], state)
            for i, o in zip(active, outs):
                out.gmacs_run += o.gmacs_run
                out.gmacs_dense += o.gmacs_dense
                out.gmacs_overhead += o.gmacs_overhead
                out.gmacs_padding += o.gmacs_padding
                if t == 0:
                    out.gmacs_first += o.gmacs_run
                if o.detections is not None:
                    dets[i].append(o.detections)
                clip_probs[i].extend(c.probs for c in o.clips)
        for i, o in zip(active, runner.finish(state)):
            clip_probs[i].extend(c.probs for c in o.clips)
        out.detections.extend(dets)
        out.probs.extend(torch.stack(p).mean(0) if p else None for p in clip_probs)
        out.frames += sum(lengths)
        out.videos += len(group)
    out.wall_s = time.time() - t0
    return out


def _truths(videos) -> list:
    from models.metrics import ImageTruth

    return [ImageTruth(lab.boxes, lab.labels, lab.difficult) for v in videos for lab in v.labels]


def _as_image_detections(per_video: list[list[Any]], min_score: float = 0.0) -> list:
    from models.metrics import ImageDetections

    out = []
    for frames in per_video:
        for d in frames:
            keep = d.scores >= min_score
            out.append(ImageDetections(d.boxes[keep].numpy(), d.scores[keep].numpy(),
                                       d.labels[keep].numpy()))
    return out


def _reference(per_video: list[list[Any]]) -> list:
    from models.metrics import ImageTruth

    return [ImageTruth(d.boxes, d.labels)
            for d in _as_image_detections(per_video, AGREEMENT_SCORE)]


def _split_videos(task: str, data_root: Path, split: str, limit: int | None) -> list:
    from pipeline.training_data import DatasetError, detection_videos, load_recognition_clips

    try:
        if task == "detection":
            return detection_videos(data_root, split, limit)
        clips = load_recognition_clips(data_root, split, decode=False, limit=limit)
        return list(zip(clips.paths, clips.labels.tolist()))
    except DatasetError as exc:
        raise UserError(str(exc)) from None


def _reader(task: str):
    from pipeline.training_data import read_video

    return (lambda v: read_video(v.path)) if task == "detection" else (lambda v: read_video(v[0]))


def accuracy(task: str, videos: list, run: RunOutput, dense: RunOutput | None = None
             ) -> tuple[str, float, float]:
    """(metric, value, agreement with ``dense``; NaN without it)."""
    from models.metrics import map50, top1

    if task == "detection":
        value = map50(_as_image_detections(run.detections), _truths(videos)).map50
        agree = math.nan
        if dense is not None:
            agree = map50(_as_image_detections(run.detections), _reference(dense.detections)).map50
        return "map50", value, agree
    pred = [int(p.argmax()) for p in run.probs]
    value = top1(pred, [label for _, label in videos])
    agree = math.nan
    if dense is not None:
        agree = top1(pred, [int(p.argmax()) for p in dense.probs])
    return "top1", value, agree


def dense_metrics(model, data_root: str | Path, split: str, limit: int | None = None,
                  streams: int = 4) -> dict[str, float]:
    """The dense model's accuracy on a split (what a zoo card reports)."""
    from models import StreamRunner, build_method

    task = model.task
    videos = _split_videos(task, Path(data_root), split, limit)
    runner = StreamRunner(model, build_method("none"), score_threshold=EVAL_SCORE)
    run = run_streams(runner, videos, streams, _reader(task))
    metric, value, _ = accuracy(task, videos, run)
    return {metric: round(value, 4), "videos": run.videos, "frames": run.frames,
            "gmacs_per_frame": round(run.gmacs_run / max(run.frames, 1), 4)}


# --- the grid -------------------------------------------------------------------------------

def parse_grid(items: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``METHOD:KEY=V1,V2[:KEY=...]`` items to {method: [params, ...]} (product of keys)."""
    import itertools
    import json

    out: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        method, _, rest = item.partition(":")
        if not method or not rest:
            raise UserError(f"--grid {item!r}: expected METHOD:KEY=V1,V2[:KEY=...]")
        axes = []
        for part in rest.split(":"):
            key, sep, values = part.partition("=")
            if not sep or not key or not values:
                raise UserError(f"--grid {item!r}: {part!r} is not KEY=V1,V2")
            parsed = []
            for v in values.split(","):
                try:
                    parsed.append(json.loads(v))
                except json.JSONDecodeError:
                    parsed.append(v)
            axes.append([(key, v) for v in parsed])
        out.setdefault(method, []).extend(dict(c) for c in itertools.product(*axes))
    return out


def _applies(cls, model) -> bool:
    from models import MethodError

    try:
        cls().check(model)
    except (MethodError, TypeError):
        return False
    return True


def _setting(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items()) or "default"


def _grid_for(name: str, cls, user: dict[str, list[dict]]) -> list[dict[str, Any]]:
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    if name in user:
        for params in user[name]:
            unknown = set(params) - fields
            if unknown:
                raise UserError(f"--grid {name}: unknown parameter(s) {', '.join(sorted(unknown))};"
                                f" {name} takes {', '.join(sorted(fields)) or 'none'}")
        return user[name]
    grid = DEFAULT_GRIDS.get(name, [{}])
    if any(set(p) - fields for p in grid):
        print(f"note: the default grid of {name} ({grid}) does not match its parameters "
              f"({', '.join(sorted(fields)) or 'none'}); running its defaults only",
              file=sys.stderr)
        return [{}]
    return grid


# --- the command ----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from models import METHODS, MethodError, StreamRunner, build_method, zoo_entries
    from models.registry import ARCHS, build_zoo_model

    if args.streams < 1:
        raise UserError(f"--streams must be positive, got {args.streams}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be positive, got {args.limit}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    data_root = Path(args.data) / args.task
    if not (data_root / "dataset.json").is_file():
        raise UserError(f"{data_root}: no generated {args.task} data; run "
                        f"`vidprune generate --out {args.data}` first")
    entries = zoo_entries(args.zoo_dir)
    if args.model:
        unknown = [m for m in args.model if m not in entries]
        if unknown:
            raise UserError(f"unknown zoo model(s) {', '.join(unknown)}; available: "
                            f"{', '.join(sorted(entries)) or '(none)'}")
        models = args.model
    else:
        models = [n for n, e in sorted(entries.items()) if ARCHS[e.arch].task == args.task]
    if not models:
        raise UserError(f"no zoo model for {args.task}; train one with `vidprune train`")
    for m in models:
        if ARCHS[entries[m].arch].task != args.task:
            raise UserError(f"zoo model {m} is not a {args.task} model")
    methods = args.methods or [m for m in METHODS if m != "none"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; registered: "
                        f"{', '.join(sorted(METHODS))}")
    user_grid = parse_grid(args.grid)
    for m in user_grid:
        if m not in METHODS:
            raise UserError(f"--grid names unknown method {m!r}")
    plans = {m: _grid_for(m, METHODS[m], user_grid) for m in methods if m != "none"}
    if args.threads:
        torch.set_num_threads(args.threads)

    videos = _split_videos(args.task, data_root, args.split, args.limit)
    if not videos:
        raise UserError(f"{data_root}/{args.split} has no videos")
    read = _reader(args.task)
    rows = []
    for model_name in models:
        model = build_zoo_model(model_name, args.zoo_dir)

        def row(method: str, setting: str, run_out: RunOutput, dense: RunOutput | None):
            metric, value, agree = accuracy(args.task, videos, run_out, dense)
            frames = max(run_out.frames, 1)
            after = run_out.frames - (run_out.videos if model.kind == "frame" else 0)
            first = run_out.gmacs_first if model.kind == "frame" else 0.0
            r = {"task": args.task, "model": model_name, "method": method, "setting": setting,
                 "metric": metric, "value": value, "agreement": agree,
                 "gmacs_per_frame": run_out.gmacs_run / frames,
                 "savings": 1.0 - run_out.gmacs_run / run_out.gmacs_dense
                 if run_out.gmacs_dense else math.nan,
                 "gmacs_dense_per_frame": run_out.gmacs_dense / frames,
                 "gmacs_overhead_per_frame": run_out.gmacs_overhead / frames,
                 "gmacs_per_frame_after_first": (run_out.gmacs_run - first) / max(after, 1),
                 "gmacs_padding_per_frame": run_out.gmacs_padding / frames,
                 "frames": run_out.frames, "videos": run_out.videos, "split": args.split,
                 "wall_s": round(run_out.wall_s, 1)}
            print(f"{model_name} {method} {setting}: {metric} {value:.4f}, agreement "
                  f"{agree:.4f}, {r['gmacs_per_frame']:.4f} GMACs/frame "
                  f"(savings {r['savings']:.1%}), {run_out.wall_s:.0f} s",
                  file=sys.stderr, flush=True)
            rows.append(r)

        def go(method):
            runner = StreamRunner(model, method, score_threshold=EVAL_SCORE)
            return run_streams(runner, videos, args.streams, read)

        dense = go(build_method("none"))
        row("none", "dense", dense, dense)
        model_plans = plans
        if "svit" in plans and _applies(METHODS["svit"], model):
            # a model with trained SViT gates (a "<model>-svit" entry) is there for svit; the
            # other methods run on its base model
            model_plans = {"svit": plans["svit"]}
        for name, grid in model_plans.items():
            for params in grid:
                try:
                    method = build_method(name, **params)
                    method.check(model)
                except MethodError as exc:
                    if name in user_grid or args.methods:
                        print(f"skipping {name} {_setting(params)} on {model_name}: {exc}",
                              file=sys.stderr)
                    continue
                row(name, _setting(params), go(method), dense)

    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows).select(list(RESULT_COLUMNS))
    _atomic(out / "results.parquet", lambda p: pq.write_table(table, p))
    _atomic(out / "results.md", lambda p: Path(p).write_text(markdown_table(rows)))
    _atomic(out / "accuracy_vs_gmacs.png", lambda p: plot(rows, p))
    print(out / "results.parquet")
    return 0


def _atomic(path: Path, write) -> None:
    import os

    tmp = path.with_name(path.name + ".part")
    write(str(tmp))
    os.replace(tmp, path)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | method | setting | metric | value | agreement | GMACs/frame | "
             "savings | GMACs/frame w/o first |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['setting']} | {r['metric']} | "
            f"{100 * r['value']:.2f} | {100 * r['agreement']:.2f} | {r['gmacs_per_frame']:.4f} | "
            f"{100 * r['savings']:.1f}% | {r['gmacs_per_frame_after_first']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == m]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r["gmacs_per_frame"], 100 * r["value"], r["setting"])
                         for r in sub if r["method"] == method)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if method == "none":
                ax.scatter(xs, ys, marker="*", s=160, color="black", label="dense", zorder=3)
            else:
                ax.plot(xs, ys, marker="o", label=method)
                for x, y, s in pts:
                    ax.annotate(s, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("backbone GMACs per frame (executed)")
        ax.set_ylabel(f"{sub[0]['metric']} (%)")
        ax.set_title(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
