"""``vidprune demo``: the main job on the videos shipped with vidprune, with a local Ray and a
local output folder.

The demo's videos come from :data:`DEMO_SOURCES`: functions that, given a scratch folder,
return video files: the real clips shipped in ``jobs/samples/videos`` and two scenes from the
benchmark generator (``pipeline/synthetic.py``, the kind of video the zoo models were trained
on), made once into the scratch folder. The videos are linked into ``<out>-videos/`` and the
job reads that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "videos"


def sample_clips(scratch: Path) -> list[Path]:
    """The real clips in jobs/samples/videos (see its README.md)."""
    from pipeline.listing import DEFAULT_PATTERNS, matches

    return sorted(p for p in SAMPLES.iterdir() if p.is_file() and matches(p.name, DEFAULT_PATTERNS))


#: Generated demo scenes: (file name, seed) of detection videos from the benchmark generator.
GENERATED = [("generated_scene_0.mp4", 1000), ("generated_scene_1.mp4", 1001)]


def generated_clips(scratch: Path) -> list[Path]:
    """Scenes like those the zoo detector was trained on (seeds outside the benchmark's),
    written once: a few seconds of CPU."""
    from pipeline.synthetic import DetectionConfig, render_detection_video, video_rng, write_mp4

    scratch.mkdir(parents=True, exist_ok=True)
    out = []
    for name, seed in GENERATED:
        path = scratch / name
        if not path.exists():
            cfg = DetectionConfig(frames=96)
            frames, _ = render_detection_video(video_rng(seed, "detection", "test", 0), cfg)
            write_mp4(path, frames, cfg.fps)
        out.append(path)
    return out


DEMO_SOURCES: list[Callable[[Path], list[Path]]] = [sample_clips, generated_clips]


def demo_input(out: Path) -> Path:
    """The folder the demo job reads."""
    scratch = out.parent / f"{out.name}-videos"
    videos = [v for source in DEMO_SOURCES for v in source(scratch)]
    folders = {v.parent for v in videos}
    if len(folders) == 1:
        return folders.pop()
    scratch.mkdir(parents=True, exist_ok=True)
    for v in videos:
        link = scratch / v.name
        if not link.exists() and v.parent != scratch:
            os.symlink(v.resolve(), link)
    return scratch


def add_parser(sub) -> None:
    from .run import add_job_options

    p = sub.add_parser(
        "demo", help="run the main job on the bundled sample videos and two generated scenes",
        description="Run the main job on the sample videos shipped with vidprune and two "
                    "scenes it generates (the default zoo model with the pruning its card "
                    "recommends, local Ray), then print where the results are and a summary. "
                    "Any spec key can be changed with --set.")
    p.add_argument("--out", default="vidprune-output/demo",
                   help="output folder (default: ./vidprune-output/demo; replaced on every "
                        "run)")
    add_job_options(p, dry_run_help="make the demo's input videos (the generated scenes, "
                                     "once), then check the job as run --dry-run does; "
                                     "write no output")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..spec import load_spec
    from .run import run_spec

    out = Path(args.out).expanduser().resolve()
    base = {
        "name": "demo",
        "input": {"uri": str(demo_input(out))},
        "output": {"uri": str(out), "mode": "overwrite"},
        # Sample clips run at 10 frames per second: enough for temporal methods to find
        # redundancy, quick on a laptop CPU.
        "decode": {"fps": 10},
    }
    spec, notes = load_spec(None, args.overrides, base=base)
    code = run_spec(spec, notes, address=args.address, dry_run=args.dry_run)
    if args.dry_run:
        print(f"(Only the demo's input was prepared: generated scenes and links to the sample "
              f"clips, in {spec.input.uri}.)")
    if code == 0 and not args.dry_run:
        print(f"\nresults: {out}/videos/videos.parquet (one row per video), "
              f"{out}/annotations/ (one Parquet file per segment), {out}/job.json")
    return code
