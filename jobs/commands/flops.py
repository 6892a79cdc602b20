"""``vidprune flops``: the dense compute of a model, counted by the ledger on the meta device."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError
from ..options import parse_key_values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "flops", help="dense GMACs of a model (backbone and full model)",
        description="Count the multiply-accumulates of a model's dense forward pass with the "
                    "compute ledger, on the meta device (shapes only: no weights, no "
                    "arithmetic). One MAC is counted as one FLOP, as in the papers.")
    p.add_argument("--model", required=True,
                   help="an architecture (vitdet-b, vitdet-b-rcnn, videomae-b, vit-b, ...) or a "
                        "zoo model")
    p.add_argument("--resolution", type=int, metavar="PIXELS",
                   help="square input size in pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--frames", type=int, metavar="N",
                   help="frames per clip, for clip models (videomae, vivit)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an architecture option, e.g. tubelet=2 (ViViT) or "
                        "'rcnn={\"post_nms_topk\": 300}'; values are read as JSON when they "
                        "parse (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.flops import count_dense
    from models.registry import ModelError

    if args.frames is not None and args.frames <= 0:
        raise UserError(f"--frames must be positive, got {args.frames}")
    try:
        report = count_dense(args.model, args.resolution, args.frames,
                             parse_key_values(args.option))
    except (ModelError, ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print(format_report(report))
    return 0


def format_report(report) -> str:
    r = report.resolution
    unit = "clip" if report.per_clip else "frame"
    what = f"{report.model}" + (f" ({report.arch})" if report.arch != report.model else "")
    clip = f", {report.clip_frames}-frame clips" if report.per_clip else ""
    g = report.gmacs
    rows = [("backbone", report.backbone_gmacs,
             "transformer blocks: linear layers, attention products, relative position, "
             "residual additions"),
            ("patch embedding", g["patch_embed"], "patch/tubelet convolution, position add"),
            ("head", g["head"], report.head_counts),
            ("full model", report.full_gmacs, "backbone + patch embedding + head")]
    lines = [f"vidprune flops: {what} at {r}x{r} pixels{clip}, dense, counted by the ledger on "
             f"the meta device",
             "One multiply-accumulate (MAC) is counted as one FLOP, as in the papers: "
             "GMACs = GFLOPs here.", ""]
    header = f"{'':<16}{'GMACs/' + unit:>14}"
    if report.per_clip:
        header += f"{'GMACs/frame':>14}"
    lines.append(header)
    for name, value, note in rows:
        line = f"{name:<16}{_gmacs(value):>14}"
        if report.per_clip:
            line += f"{_gmacs(report.per_frame(value)):>14}"
        lines.append(f"{line}   {note}")
    return "\n".join(lines)


def _gmacs(value: float) -> str:
    if 0 < value < 0.0001:
        return "<0.0001"
    return f"{value:.4f}" if 0 < value < 0.01 else f"{value:.2f}"
