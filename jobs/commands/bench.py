"""``vidprune bench``: wall-clock speed and memory of the pruning methods against the dense
model, measured side by side on real frames (``models/benchmark.py`` says how).

Frame methods (eventful, stgt, rollout, svit) run on ``--model`` (a ViTDet layout by default);
clip methods (sta) on ``--clip-model`` (the VideoMAE layout). Each model gets its own dense
row, and each method's speedup is against the dense row of its model, from the same run.
Writes ``<out>/bench.parquet`` and ``<out>/bench.md`` (the table, the command line, the machine
and its load), and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "videos"
DEFAULT_VIDEOS = ("mma_test.mp4", "decord_flipping_a_pancake.mkv")

#: Default operating points; a float is a share of the N grid tokens of one frame (so the
#: points scale with the resolution), an int is taken as is. At 672 (N = 1764) each of
#: eventful, its token-wise-only variant, stgt and rollout has a point with at least 2.5x
#: fewer backbone GMACs than dense over 16 frames, dense first frame and refreshes included.
DEFAULT_FRAME_POINTS = (
    ("eventful", {"r": 1 / 4}),
    ("eventful", {"r": 1 / 8}),
    ("eventful", {"r": 1 / 8, "sparse_attention": False}),
    ("stgt", {"r": 1 / 8}),
    ("rollout", {"k": 384 / 1764}),  # the paper's K = 384 at 672
    ("svit", {}),
)
DEFAULT_CLIP_POINTS = (("sta", {"r": 48 / 196}),)  # the paper's r = 48 at 224
TOKEN_SHARES = {"r", "k"}
CLIP_METHODS = {"sta"}
#: Environment variables that change how the CPU threads behave (recorded with the results).
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
              "KMP_BLOCKTIME", "MALLOC_ARENA_MAX", "LD_PRELOAD")


def _points_text(points) -> str:
    def value(k, v):
        return f"{v:.4g}N" if k in TOKEN_SHARES and isinstance(v, float) else _value_text(v)

    return "; ".join(name + (":" + ",".join(f"{k}={value(k, v)}" for k, v in params.items())
                             if params else "") for name, params in points)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="speed and memory of the pruning methods against dense, side by side",
        description="Time the dense model and the pruning methods on real frames, interleaved "
                    "frame by frame and repeated, and write a table of GMACs per frame, "
                    "savings, latency and speedup (median of per-repetition ratios), with "
                    "state and peak memory per stream, to <out>/bench.parquet and "
                    "<out>/bench.md with the command line. One MAC counts as one FLOP, as in "
                    "the papers.",
        epilog="Default operating points (N: tokens of one frame's grid, e.g. 1764 at 672): "
               f"{_points_text(DEFAULT_FRAME_POINTS)} on --model (svit: an architecture gets "
               f"random SViT gates, a zoo model runs svit only if it has gates); {_points_text(DEFAULT_CLIP_POINTS)} on --clip-model (N: tokens of "
               "one time slice, 196 at 224). Dense always runs.")
    p.add_argument("--model", default="vitdet-s",
                   help="frame model for eventful/stgt/rollout/svit: an architecture or a zoo "
                        "model (default vitdet-s, random weights)")
    p.add_argument("--resolution", type=int, default=672, metavar="PIXELS",
                   help="square input size of the frame model (default 672)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option of the frame model, VALUE as JSON (repeatable)")
    p.add_argument("--clip-model", default="videomae-s",
                   help="clip model for sta (default videomae-s, random weights)")
    p.add_argument("--clip-resolution", type=int, default=224, metavar="PIXELS",
                   help="square input size of the clip model (default 224)")
    p.add_argument("--clip-frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--clip-option", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option of the clip model (repeatable)")
    p.add_argument("--clips", type=int, default=2,
                   help="clips per stream and repetition for clip methods (default 2)")
    p.add_argument("--method", action="append", default=[], metavar="NAME[:K=V,...]",
                   help="a method and its parameters, e.g. eventful:r=256,sparse_attention=false "
                        "or rollout:k=384 (repeatable; default: the points below)")
    p.add_argument("--svit-gates", metavar="JSON",
                   help="SViT gate spec added to an architecture without gates (default: the "
                        "authors' layout, random gate weights: the keep ratio is whatever they "
                        "give, and is reported)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="video(s) to decode with decord; stream i reads video i mod count "
                        f"(default: {', '.join(DEFAULT_VIDEOS)} from the samples)")
    p.add_argument("--streams", type=int, default=1, help="streams stepped side by side")
    p.add_argument("--frames", type=int, default=16,
                   help="frames per stream and repetition for frame methods (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up frames (default 2)")
    p.add_argument("--memory-frames", type=int, default=4,
                   help="frames of the untimed memory pass per contender (default 4; 0: skip)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model precision (default float32; float16 on CUDA only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", default="vidprune-output/bench",
                   help="output folder for bench.parquet and bench.md "
                        "(default ./vidprune-output/bench)")
    p.set_defaults(func=run)


@dataclass
class MethodSpec:
    name: str
    params: dict

    def setting(self) -> str:
        return ",".join(f"{k}={_value_text(v)}" for k, v in self.params.items()) or "-"


def _value_text(v) -> str:
    return json.dumps(v) if isinstance(v, (bool, list, dict)) or v is None else str(v)


def parse_method(text: str) -> MethodSpec:
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--method {text!r}: expected NAME[:KEY=VALUE,...]")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    if not name:
        raise UserError(f"--method {text!r}: no method name")
    return MethodSpec(name.strip(), params)


def resolve_points(points, tokens: int) -> list[MethodSpec]:
    """Default points with shares of the grid's ``tokens`` turned into token counts."""
    out = []
    for name, params in points:
        resolved = {k: (max(1, round(v * tokens)) if k in TOKEN_SHARES and isinstance(v, float)
                        else v) for k, v in params.items()}
        out.append(MethodSpec(name, resolved))
    return out


def _check(args) -> None:
    problems = []
    for flag in ("streams", "frames", "repeats", "threads", "clips", "clip_frames"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("warmup", "memory_frames"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("resolution", "clip_resolution"):
        value = getattr(args, flag)
        if value <= 0 or value % 16:
            problems.append(f"--{flag.replace('_', '-')} {value} is not a positive multiple of "
                            f"the patch size (16 pixels)")
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        problems.append("--dtype float16 needs --device cuda (use bfloat16 on the CPU)")
    if problems:
        raise UserError("; ".join(problems))


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu or cuda[:index]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here (this torch: {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected cpu or cuda[:index]")
    return device


def read_streams(videos: list[Path], streams: int, frames: int) -> list[list]:
    """``frames`` consecutive RGB frames per stream; stream i reads video i mod count,
    starting ``frames`` later than the previous stream on the same video, wrapping around."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    out = []
    readers = {}
    for i in range(streams):
        path = videos[i % len(videos)]
        if path not in readers:
            try:
                readers[path] = decord.VideoReader(str(path))
            except Exception as exc:  # decord raises its own error types
                raise UserError(f"--video {path}: cannot decode ({exc})") from None
        reader = readers[path]
        total = len(reader)
        if total < frames:
            raise UserError(f"--video {path}: {total} frames, fewer than the {frames} "
                            f"needed per stream")
        start = (i // len(videos)) * frames % max(1, total - frames + 1)
        out.append(list(reader.get_batch(list(range(start, start + frames))).asnumpy()))
    return out


def run(args: argparse.Namespace) -> int:
    _check(args)
    import torch

    torch.set_num_threads(args.threads)
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    videos = [Path(v) for v in args.video] or [SAMPLES / v for v in DEFAULT_VIDEOS]
    for v in videos:
        if not v.is_file():
            raise UserError(f"--video {v}: no such file")
    specs = [parse_method(m) for m in args.method]
    if any(s.name in ("none", "dense") for s in specs):
        raise UserError("dense always runs: leave it out of --method")
    from models import build_method
    from models.methods import METHODS, MethodError

    for s in specs:
        if s.name not in METHODS:
            raise UserError(f"--method {s.name}: unknown method; available: "
                            f"{', '.join(sorted(set(METHODS) - {'none'}))}")
    load_before = os.getloadavg()
    started = time.time()
    rows = []
    notes = []
    frame_specs = [s for s in specs if s.name not in CLIP_METHODS] if specs else None
    clip_specs = [s for s in specs if s.name in CLIP_METHODS] if specs else None
    # both groups are built, and the clip methods stepped over one clip, before anything is
    # timed: a clip method refuses a clip length only when a clip completes, which would
    # otherwise come after the minutes of the frame group's timing
    groups = [_prepare_group(args, kind, kind_specs, videos, device, dtype, build_method,
                             MethodError)
              for kind, kind_specs in (("frame", frame_specs), ("clip", clip_specs))
              if kind_specs is None or kind_specs]
    for group in groups:
        if group.kind == "clip":
            _check_clip_methods(group, MethodError)
    for group in groups:
        rows += _measure_group(args, group, notes, MethodError)
    meta = {
        "command": command_line(args),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": _machine(device),
        "torch": torch.__version__,
        "threads": args.threads,
        "environment": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "dtype": args.dtype,
        "videos": [str(v) for v in videos],
        "notes": notes,
    }
    write_outputs(Path(args.out), rows, meta)
    print(format_markdown(rows, meta))
    return 0


@dataclass
class _Group:
    """One model's side of a bench run: its contenders and the frames of its streams."""
    kind: str
    name: str
    resolution: int
    weights: str
    specs: list
    contenders: list
    streams: list


def _prepare_group(args, kind: str, specs, videos, device, dtype, build_method,
                   MethodError) -> _Group:
    import torch

    from models import ModelError, build_model, zoo_entries
    from models.benchmark import Contender, timed_runner

    name = args.model if kind == "frame" else args.clip_model
    resolution = args.resolution if kind == "frame" else args.clip_resolution
    options = _options(args.option if kind == "frame" else args.clip_option)
    if kind == "clip":
        options.setdefault("clip_frames", args.clip_frames)
    torch.manual_seed(args.seed)
    try:
        if name in zoo_entries():
            model = build_model(name)
            weights = f"zoo model {name}"
        else:
            if specs is None or any(s.name == "svit" for s in specs):
                if kind == "frame" and "svit" not in options:
                    options["svit"] = json.loads(args.svit_gates) if args.svit_gates else {}
            model = build_model(arch=name, input_size=resolution, **options)
            weights = f"random (seed {args.seed})"
    except (ModelError, ValueError, TypeError) as exc:
        raise UserError(f"--{'model' if kind == 'frame' else 'clip-model'} {name}: {exc}") \
            from None
    if model.kind != kind:
        raise UserError(f"{name} is a {model.kind} model; the {kind} methods need a {kind} "
                        f"model (--{'model' if kind == 'frame' else 'clip-model'})")
    grid = resolution // model.backbone.patch
    if specs is None:
        points = DEFAULT_FRAME_POINTS if kind == "frame" else DEFAULT_CLIP_POINTS
        specs = resolve_points(points, grid * grid)
        if kind == "frame" and not hasattr(model.backbone, "svit_gates"):
            specs = [s for s in specs if s.name != "svit"]
    contenders = [Contender("dense", "-", timed_runner(model, build_method("none"),
                                                       device=device, dtype=dtype,
                                                       input_size=resolution))]
    for s in specs:
        try:
            method = build_method(s.name, **s.params)
            contenders.append(Contender(s.name, s.setting(), timed_runner(
                model, method, device=device, dtype=dtype, input_size=resolution)))
        except MethodError as exc:
            raise UserError(f"--method {s.name}:{s.setting()}: {exc}") from None
    frames = args.frames if kind == "frame" else args.clips * args.clip_frames
    streams = read_streams(videos, args.streams, frames)
    return _Group(kind, name, resolution, weights, specs, contenders, streams)


def _check_clip_methods(group: _Group, MethodError) -> None:
    """Step every clip method over one clip of the first stream (untimed; its state is
    dropped), so that a method that refuses this clip length says so now."""
    frames = group.streams[0][:group.contenders[0].runner.clip_frames]
    for c in group.contenders[1:]:
        state = c.runner.new_state(1)
        try:
            for frame in frames:
                c.runner.step([frame], state)
        except MethodError as exc:
            raise UserError(f"--method {c.method}:{c.setting}: {exc}") from None


def _measure_group(args, group: _Group, notes, MethodError) -> list[dict]:
    from models.benchmark import measure_memory, run_side_by_side, summarise

    name, kind, specs = group.name, group.kind, group.specs
    label = (f"{name} at {group.resolution}" + (f", {args.clip_frames}-frame clips"
                                                 if kind == "clip" else "")
             + f", weights {group.weights}")
    print(f"vidprune bench: {label}: dense + {len(specs)} method(s), {args.streams} stream(s) x "
          f"{len(group.streams[0])} frames x {args.repeats} repetitions", file=sys.stderr,
          flush=True)
    try:
        measurements = run_side_by_side(
            group.contenders, group.streams, args.repeats, args.warmup,
            progress=lambda line: print(f"vidprune bench: {name}: {line}", file=sys.stderr,
                                        flush=True))
    except MethodError as exc:
        raise UserError(str(exc)) from None
    if args.memory_frames:
        for m in measurements:
            measure_memory(m, group.streams, args.memory_frames)
    rows = summarise(measurements, measurements[0])
    for row in rows:
        row.update({"model": name, "resolution": group.resolution, "weights": group.weights,
                    "dtype": args.dtype, "threads": args.threads})
    if any(s.name == "svit" for s in specs) and group.weights.startswith("random"):
        notes.append("svit runs random gate weights: its keep ratio is what they happen to "
                     "give (token_fraction), not a trained model's")
    return rows


def _options(items: list[str]) -> dict:
    from ..options import parse_key_values

    return parse_key_values(items)


def command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
    return "vidprune " + shlex.join(argv)


def _machine(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


# --- outputs -------------------------------------------------------------------------------

#: Columns of the Markdown table, with their headers.
MARKDOWN_COLUMNS = (
    ("method", "method"), ("setting", "setting"), ("device", "device"), ("streams", "streams"),
    ("gmacs_per_frame", "gmacs_per_frame"), ("savings", "savings"),
    ("latency_ms", "latency_ms"), ("speedup", "speedup"),
    ("speedup_range", "speedup min-max"), ("gmacs_steady", "gmacs steady"),
    ("latency_steady_ms", "latency steady ms"), ("speedup_steady", "speedup steady"),
    ("frame_latency_ms", "frame ms"), ("frame_speedup", "frame speedup"),
    ("token_fraction", "tokens"), ("state_mb_per_stream", "state MB/stream"),
    ("peak_mb_per_stream", "peak MB/stream"), ("gmacs_padding_per_frame", "padding gmacs"),
)


def write_outputs(out: Path, rows: list[dict], meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {"vidprune.bench": json.dumps(meta)})
    _atomic(out / "bench.parquet", lambda p: pq.write_table(table, p))
    text = format_markdown(rows, meta)
    _atomic(out / "bench.md", lambda p: p.write_text(text))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def format_markdown(rows: list[dict], meta: dict) -> str:
    env = " ".join(f"{k}={v}" for k, v in meta.get("environment", {}).items())
    lines = [f"```\n{env + ' ' if env else ''}{meta['command']}\n```", ""]
    lines.append(f"{meta['machine']}; torch {meta['torch']}, {meta['threads']} threads, "
                 f"{meta['dtype']}; started {meta['started']}, {meta['elapsed_s']} s; load "
                 f"average {meta['load_before'][0]} before, {meta['load_after'][0]} after.")
    lines.append("")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["resolution"], row["weights"]), []).append(row)
    for (model, resolution, weights), group in groups.items():
        g = group[0]
        lines.append(f"{model} at {resolution}x{resolution}, weights {weights}; "
                     f"{g['frames']} frames per stream x {g['repeats']} repetitions; "
                     f"peak memory: {g['peak_kind']}.")
        lines.append("")
        lines.append("| " + " | ".join(h for _, h in MARKDOWN_COLUMNS) + " |")
        lines.append("|" + "|".join("---" for _ in MARKDOWN_COLUMNS) + "|")
        for row in group:
            lines.append("| " + " | ".join(_cell(row, k) for k, _ in MARKDOWN_COLUMNS) + " |")
        lines.append("")
    for note in meta.get("notes", []):
        lines.append(f"Note: {note}.")
    return "\n".join(lines).rstrip() + "\n"


def _cell(row: dict, key: str) -> str:
    if key == "speedup_range":
        return f"{row['speedup_min']:.2f}-{row['speedup_max']:.2f}"
    value = row[key]
    if isinstance(value, float):
        if value != value:  # NaN
            return "not measured"
        if key == "savings":
            return f"{100 * value:.1f}%"
        if key in ("speedup", "speedup_steady", "frame_speedup", "token_fraction"):
            return f"{value:.2f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)
