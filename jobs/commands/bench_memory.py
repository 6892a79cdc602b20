"""``vidprune bench-memory``: how much memory decoding and an annotator actor need, and
whether it grows with the length of a video (docs/MEMORY.md holds its results).

Each measurement runs in a fresh process and reads peak resident memory (``VmHWM``) of
that process and of its decoder child from ``/proc`` (Linux):

- **decoder**: a long and a short video (default 10,000 and 1,000 frames of 1080p) decoded
  whole through :class:`operators.decode.SegmentDecoder`; peak memory must not grow with
  the length (within 1.2x);
- **decord**: decord 0.6, which vidprune used before, read frame by frame by a caller as slow
  as a model (``--model-ms``): it decodes ahead without limit; then the same through
  :class:`SegmentDecoder` with ``backend="decord"`` (``decode.backend: decord``), whose child
  stops decord's thread after every batch;
- **index**: opening (probing) each video, which reads every packet once to number frames;
- **overhead**: the decoder child against decoding in the calling process (wall and CPU);
- **actor**: an annotator actor (``operators.annotator.AnnotatorActor``, no Ray) running a
  model over a segment of each video, one or more streams side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..options import parse_key_values


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench-memory", help="measure decoder and actor memory (docs/MEMORY.md)",
        description="Generate a long and a short test video and measure peak memory of the "
                    "decoder and of an annotator actor on each, in fresh processes.")
    p.add_argument("--workdir", default="vidprune-output/bench-memory",
                   help="where the generated videos are kept (reused when present)")
    p.add_argument("--long", type=int, default=10_000, metavar="FRAMES",
                   help="frames of the long test video (default 10000)")
    p.add_argument("--short", type=int, default=1_000, metavar="FRAMES",
                   help="frames of the short test video (default 1000)")
    p.add_argument("--size", default="1920x1080", metavar="WxH",
                   help="frame size of the test videos (default 1920x1080)")
    p.add_argument("--model-ms", type=float, default=50.0,
                   help="per-frame pause of the slow caller in the decord comparison")
    p.add_argument("--arch", action="append", default=[], metavar="ARCH",
                   help="architecture for the actor measurement (repeatable; default "
                        "vitdet-ti with the options below)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option for --arch (e.g. input_size=512)")
    p.add_argument("--actor-frames", type=int, default=2048, metavar="N",
                   help="at most this many frames of each video per actor run (default: one "
                        "segment of the default decode.segment_frames)")
    p.add_argument("--method", default="none", help="pruning method of the actor runs")
    p.add_argument("--streams", type=int, default=1,
                   help="streams per actor in the actor runs (default 1)")
    p.add_argument("--skip", action="append", default=[],
                   choices=["decoder", "decord", "index", "overhead", "actor"],
                   help="leave out a measurement (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


# -- measurements, each in a fresh process ----------------------------------------------------

def _status_kib(pid: int | str, key: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int | str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_decoder(path: str, frames: int, pause_s: float = 0.0,
                    backend: str = "pyav") -> dict[str, Any]:
    from fsspec.implementations.local import LocalFileSystem

    from operators.decode import SegmentDecoder

    decoder = SegmentDecoder(LocalFileSystem(), path, list(range(frames)), backend=backend)
    t0 = time.perf_counter()
    child = {}
    while decoder.read() is not None:
        if pause_s:
            time.sleep(pause_s)
        if decoder.frames_decoded == frames:  # the child has done all its work
            child = {"child_peak_mib": _status_kib(decoder.child_pid) / 1024,
                     "child_cpu_s": _cpu_s(decoder.child_pid)}
    return {"frames": decoder.frames_decoded, "error": decoder.error,
            "wall_s": time.perf_counter() - t0, "caller_peak_mib": _status_kib("self") / 1024,
            "caller_cpu_s": _cpu_s("self"), **child}


def measure_inprocess(path: str, frames: int) -> dict[str, Any]:
    from operators.decode import AVSegment

    t0, cpu0 = time.perf_counter(), _cpu_s("self")
    segment = AVSegment(path, list(range(frames)))
    n = 0
    while segment.read() is not None:
        n += 1
    return {"frames": n, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s("self") - cpu0,
            "peak_mib": _status_kib("self") / 1024}


def measure_decord(path: str, frames: int, pause_s: float) -> dict[str, Any]:
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    peak_at = []
    for i in range(min(frames, len(reader))):
        reader.next().asnumpy()
        time.sleep(pause_s)
        if i % 25 == 0:
            peak_at.append((i, _status_kib("self", "VmRSS") / 1024))
    return {"frames": frames, "peak_mib": _status_kib("self") / 1024, "rss_mib_by_frame": peak_at}


def measure_index(path: str) -> dict[str, Any]:
    """Opening a video: the probe (an MP4's header), the full index a segment builds when
    it opens the video (every packet read once, none decoded), and decord's open."""
    from fsspec.implementations.local import LocalFileSystem

    from operators.decode import MediaIndex, _open, probe
    from operators.isolation import shared_pool

    pool = shared_pool()
    pool.give(pool.take())  # started before the clock: the probe's own cost only
    t0 = time.perf_counter()
    info = probe(LocalFileSystem(), path)
    probe_s = time.perf_counter() - t0
    _open(path)[0].close()  # FFmpeg's libraries loaded: the index's own memory below
    before = _status_kib("self", "VmRSS")
    t0 = time.perf_counter()
    container, stream = _open(path)
    index = MediaIndex.build(container, stream)
    index_s = time.perf_counter() - t0
    index_mib = (_status_kib("self", "VmRSS") - before) / 1024
    container.close()
    out = {"frames": info["frames_total"], "probe_s": probe_s, "index_s": index_s,
           "index_frames": len(index), "index_mib": index_mib, "bytes": os.path.getsize(path)}
    try:
        import decord
    except ImportError:
        return out
    t0 = time.perf_counter()
    decord.VideoReader(path, num_threads=1)
    out["decord_open_s"] = time.perf_counter() - t0
    return out


def measure_actor(model: dict[str, Any], path: str, frames: int, streams: int,
                  method: str = "none") -> dict[str, Any]:
    import tempfile

    from fsspec.implementations.local import LocalFileSystem

    from operators.annotator import AnnotatorActor
    from operators.decode import probe
    from operators.isolation import shared_pool
    from pipeline.manifest import build_manifest
    from pipeline.outputs import SegmentWriter
    from pipeline.storage import Location

    local = LocalFileSystem()
    info = probe(local, path)
    info["frames_total"] = min(info["frames_total"], frames)
    rows = build_manifest([{"uri": path, "identity": f"bench-{i}", "size_bytes": 1,
                            "probe_error": None, **info} for i in range(streams)],
                          10 ** 9, "bench").to_pylist()
    with tempfile.TemporaryDirectory() as out:
        from models import build_method

        params = build_method(method).describe()
        actor = AnnotatorActor(model={**model, "dtype": "float32"}, method=method, params=params,
                               decode={"fps": None, "frame_stride": 1}, input_fs=local,
                               writer=SegmentWriter(Location.open(out), "detection"),
                               job={"job_id": "bench", "fingerprint": "bench"}, cpus=1)
        loaded_mib = _status_kib("self", "VmRSS") / 1024
        t0 = time.perf_counter()
        stats = actor.process(rows)
        wall_s = time.perf_counter() - t0
    # The decoder children went back to the pool; their peaks are this run's.
    children = [_status_kib(pid) / 1024 for pid in shared_pool().pids()]
    return {"frames": sum(s["frames_decoded"] for s in stats), "streams": streams,
            "wall_s": wall_s, "model_loaded_mib": loaded_mib,
            "actor_peak_mib": _status_kib("self") / 1024,
            "children_peak_mib": sum(children), "errors": [s["error"] for s in stats
                                                           if s["error"]]}


def _fresh(fn, *args) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# -- the command ------------------------------------------------------------------------------

def _generate(path: Path, frames: int, size: str) -> float:
    import imageio_ffmpeg

    if path.exists():
        return 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp.mp4")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc=size={size}:rate=30", "-frames:v",
                    str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset",
                    "ultrafast", "-crf", "38", "-g", "250", str(tmp)], check=True)
    tmp.rename(path)
    return time.perf_counter() - t0


def run(args) -> int:
    if not os.path.exists("/proc/self/status"):
        raise UserError("bench-memory reads /proc: it runs on Linux only")
    if not args.size.count("x") == 1:
        raise UserError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 1920x1080")
    work = Path(args.workdir).expanduser().resolve()
    videos = {}
    for name, frames in (("short", args.short), ("long", args.long)):
        path = work / f"{name}-{frames}-{args.size}.mp4"
        seconds = _generate(path, frames, args.size)
        if seconds:
            print(f"generated {path} in {seconds:.0f} s", file=sys.stderr)
        videos[name] = (str(path), frames)
    report: dict[str, Any] = {"size": args.size, "videos": {k: v[1] for k, v in videos.items()}}
    say = (lambda *a: None) if args.json else print

    if "index" not in args.skip:
        report["index"] = {k: _fresh(measure_index, p) for k, (p, _) in videos.items()}
        for k, r in report["index"].items():
            say(f"index   {k:5s} {r['frames']:>6,d} frames  probe {r['probe_s']:5.2f} s  full "
                f"index {r['index_s']:5.2f} s (+{r['index_mib']:.1f} MiB)  decord open "
                f"{r.get('decord_open_s', float('nan')):5.2f} s  ({r['bytes'] / 2**20:.1f} MiB "
                "file)")
    if "decoder" not in args.skip:
        report["decoder"] = {k: _fresh(measure_decoder, p, n) for k, (p, n) in videos.items()}
        for k, r in report["decoder"].items():
            say(f"decoder {k:5s} {r['frames']:>6,d} frames  {r['wall_s']:6.1f} s  child peak "
                f"{r['child_peak_mib']:7.1f} MiB  caller peak {r['caller_peak_mib']:7.1f} MiB")
        d = report["decoder"]
        report["decoder_ratio"] = d["long"]["child_peak_mib"] / d["short"]["child_peak_mib"]
        say(f"decoder long/short peak: {report['decoder_ratio']:.2f}x")
    if "overhead" not in args.skip:
        path, n = videos["short"]
        best = {"in_process": None, "child": None}
        for _ in range(3):
            a = _fresh(measure_inprocess, path, n)
            b = _fresh(measure_decoder, path, n)
            b["cpu_s"] = b["caller_cpu_s"] + b.get("child_cpu_s", 0.0)
            for key, r in (("in_process", a), ("child", b)):
                if best[key] is None or r["wall_s"] < best[key]["wall_s"]:
                    best[key] = r
        report["overhead"] = best
        a, b = best["in_process"], best["child"]
        say(f"overhead {n:,d} frames: in process {a['wall_s']:.1f} s ({a['cpu_s']:.1f} CPU s), "
            f"child {b['wall_s']:.1f} s ({b['cpu_s']:.1f} CPU s): "
            f"{100 * (b['wall_s'] / a['wall_s'] - 1):+.0f}% wall, "
            f"{1000 * (b['cpu_s'] - a['cpu_s']) / n:+.2f} CPU ms per frame")
    if "decord" not in args.skip:
        try:
            import decord  # noqa: F401
        except ImportError:
            say("decord: not installed, skipped")
        else:
            path, _ = videos["short"]
            n = min(args.short, 300)
            report["decord"] = _fresh(measure_decord, path, n, args.model_ms / 1000)
            say(f"decord  short {n:>6,d} frames, caller {args.model_ms:.0f} ms/frame: peak "
                f"{report['decord']['peak_mib']:7.1f} MiB (decoding ahead of its caller)")
            r = report["decord_child"] = _fresh(measure_decoder, path, n, args.model_ms / 1000,
                                                "decord")
            say(f"decord  child {n:>6,d} frames, caller {args.model_ms:.0f} ms/frame: "
                f"{r['wall_s']:6.1f} s  child peak {r.get('child_peak_mib', float('nan')):7.1f} "
                f"MiB  caller peak {r['caller_peak_mib']:7.1f} MiB (decode.backend: decord)")
    if "actor" not in args.skip:
        options = parse_key_values(args.option)
        archs = args.arch or ["vitdet-ti"]
        if not args.arch:
            options = {"input_size": 256, **options}
        report["actor"] = {}
        for arch in archs:
            model = _random_model(arch, options, work)
            for k, (path, n) in videos.items():
                frames = min(n, args.actor_frames)
                r = _fresh(measure_actor, model, path, frames, args.streams, args.method)
                report["actor"][f"{arch}/{k}"] = r
                say(f"actor   {arch} {args.method} {k:5s} {r['frames']:>6,d} frames "
                    f"x{args.streams}  "
                    f"{r['wall_s']:6.1f} s  model loaded {r['model_loaded_mib']:7.1f} MiB  "
                    f"actor peak {r['actor_peak_mib']:7.1f} MiB  decoder children "
                    f"{r['children_peak_mib']:6.1f} MiB" + (f"  errors: {r['errors']}"
                                                           if r["errors"] else ""))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _random_model(arch: str, options: dict[str, Any], work: Path) -> dict[str, Any]:
    """A randomly initialised checkpoint of ``arch`` (memory does not depend on weights)."""
    import torch
    from safetensors.torch import save_file

    from models import build_arch

    tag = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    path = work / f"{arch}{'-' + tag if tag else ''}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = build_arch(arch, **options)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return {"arch": arch, "checkpoint": str(path), "options": dict(options),
            "score_threshold": 0.3}
