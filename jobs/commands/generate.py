"""``vidprune generate``: labelled benchmark videos (see ``pipeline/synthetic.py``)."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate labelled benchmark videos (detection, recognition)",
        description="Generate labelled H.264 videos deterministically from a seed: "
                    "OUT/<task>/<split>/videos/*.mp4 with labels.parquet and videos.parquet. "
                    "Train, val and test use disjoint seeds.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", choices=("detection", "recognition", "all"), default="all")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--train", type=int, help="videos in the train split (default per task)")
    p.add_argument("--val", type=int, help="videos in the val split")
    p.add_argument("--test", type=int, help="videos in the test split")
    p.add_argument("--frames", type=int,
                   help="frames per detection video (default 120; recognition clips are 16)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.synthetic import DEFAULT_SIZES, DetectionConfig, SplitSizes, generate

    for name in ("train", "val", "test", "frames"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "frames" else 0):
            raise UserError(f"--{name} must be {'positive' if name == 'frames' else '>= 0'}, "
                            f"got {value}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    tasks = ("detection", "recognition") if args.task == "all" else (args.task,)
    det = DetectionConfig() if args.frames is None else DetectionConfig(frames=args.frames)

    def progress(split: str, i: int, n: int) -> None:
        if not args.quiet and (i == n or i % max(1, n // 20) == 0):
            print(f"\r  {split}: {i}/{n}", end="\n" if i == n else "", file=sys.stderr,
                  flush=True)

    for task in tasks:
        base = DEFAULT_SIZES[task]
        sizes = SplitSizes(*(getattr(args, s) if getattr(args, s) is not None
                             else getattr(base, s) for s in ("train", "val", "test")))
        if not args.quiet:
            print(f"{task}: {sizes.train} train, {sizes.val} val, {sizes.test} test videos, "
                  f"seed {args.seed}", file=sys.stderr)
        root = generate(out, task, args.seed, sizes, det=det, progress=progress)
        print(root)
    return 0
