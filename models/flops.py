"""Dense compute of a model, counted by the ledger on the meta device (shapes only, no
arithmetic, no memory): what ``vidprune flops`` prints.

One multiply-accumulate (MAC) counts as one FLOP, as in the papers (see ``models/ledger.py``).
The backbone figure is the papers' headline figure (transformer blocks); the full model adds
the patch embedding and the head. Decoding predictions is data dependent (how many boxes pass
a threshold, survive NMS), so heads are counted up to their raw outputs: for the two-stage
R-CNN head that is the RPN on every pyramid level plus the box head and predictor on the
standard number of proposals (``post_nms_topk``), the number a dense frame normally yields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .ledger import CATEGORIES, Ledger


@dataclass
class FlopsReport:
    """Dense GMACs of one model at one input size, per frame and (clip models) per clip."""

    model: str
    arch: str
    resolution: int
    clip_frames: int                 # frames per clip; 1 for frame-by-frame models
    per_clip: bool                   # figures are naturally per clip (VideoMAE, ViViT)
    gmacs: dict[str, float]          # by ledger category, per clip (or per frame)
    head_counts: str                 # what the head figure includes
    notes: list[str] = field(default_factory=list)

    @property
    def backbone_gmacs(self) -> float:
        return self.gmacs["backbone"] + self.gmacs["overhead"]

    @property
    def full_gmacs(self) -> float:
        return sum(self.gmacs.values())

    def per_frame(self, value: float) -> float:
        return value / self.clip_frames

    def as_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "arch": self.arch, "resolution": self.resolution,
               "clip_frames": self.clip_frames, "unit": "clip" if self.per_clip else "frame",
               "backbone_gmacs": self.backbone_gmacs, "full_gmacs": self.full_gmacs,
               "backbone_gmacs_per_frame": self.per_frame(self.backbone_gmacs),
               "full_gmacs_per_frame": self.per_frame(self.full_gmacs),
               "gmacs_by_part": dict(self.gmacs), "head_counts": self.head_counts,
               "mac_is_flop": True}
        return out


def build_meta(name: str, resolution: int | None = None, frames: int | None = None,
               options: dict[str, Any] | None = None) -> tuple[nn.Module, str]:
    """Model ``name`` (an architecture or a zoo model) on the meta device; returns it and its
    architecture name. ``frames`` sets the clip length of recognizers; ``options`` are
    architecture options (:func:`models.registry.build_arch`)."""
    from .registry import ARCHS, ModelError, build_arch, zoo_entries

    extra = dict(options or {})
    options = {}
    class_names = None
    zoo = zoo_entries()
    if name in zoo:
        arch, options, class_names = zoo[name].arch, dict(zoo[name].options), zoo[name].class_names
    elif name in ARCHS:
        arch = name
    else:
        raise ModelError(f"unknown model {name!r}; zoo models: "
                         f"{', '.join(sorted(zoo)) or '(none shipped)'}; architectures: "
                         f"{', '.join(sorted(ARCHS))}")
    options.update(extra)
    family = ARCHS[arch].family
    if frames is not None:
        if family not in ("videomae", "vivit"):
            raise ModelError(f"--frames applies to clip models (videomae, vivit); {arch} runs "
                             f"frame by frame")
        options["clip_frames"] = frames
    if resolution is not None:
        if resolution <= 0 or resolution % 16:
            raise ModelError(f"resolution {resolution} is not a positive multiple of the patch "
                             f"size (16 pixels)")
        options["input_size"] = resolution
    with torch.device("meta"):
        model = build_arch(arch, class_names=class_names, **options)
    return model.eval(), arch


def count_dense(name: str, resolution: int | None = None, frames: int | None = None,
                options: dict[str, Any] | None = None) -> FlopsReport:
    """Dense GMACs of model ``name`` at ``resolution`` (default: the model's own)."""
    model, arch = build_meta(name, resolution, frames, options)
    r = int(model.input_size)
    led = Ledger(1)
    family = model.arch.family
    with torch.no_grad():
        if model.task == "detection":
            head_counts = _count_detector(model, r, led)
            clip_frames, per_clip = 1, False
        elif family == "videomae":
            model(torch.zeros(1, 3, model.clip_frames, r, r, device="meta"), led)
            head_counts = "fc_norm and the linear classifier on the mean-pooled tokens"
            clip_frames, per_clip = model.clip_frames, True
        elif family == "vivit":
            model(torch.zeros(1, 3, model.clip_frames, r, r, device="meta"), led)
            head_counts = ("the linear classifier; the backbone figure includes the temporal "
                           "transformer")
            clip_frames, per_clip = model.clip_frames, True
        else:
            model(torch.zeros(1, 3, r, r, device="meta"), led)
            head_counts = "the linear classifier on the class token"
            clip_frames, per_clip = 1, False
    gmacs = {k: float(led.macs[k][0]) / 1e9 for k in CATEGORIES}
    return FlopsReport(name, arch, r, clip_frames, per_clip, gmacs, head_counts)


def _count_detector(model: nn.Module, r: int, led: Ledger) -> str:
    from .heads import CenterNetHead
    from .rcnn import RCNNHead

    bb = model.backbone
    e = bb.embed(torch.zeros(1, 3, r, r, device="meta"), led)
    tokens, _ = bb.forward_blocks(e.tokens, e.grid, led)
    fmap = bb.norm(tokens[:, e.prefix:]).transpose(1, 2).reshape(1, bb.dim, *e.grid)
    features = model.neck(fmap, led)
    if isinstance(model.head, RCNNHead):
        s = model.head.settings
        model.head.forward_raw(features, led)
        return (f"simple feature pyramid + Faster R-CNN head: RPN convolutions on "
                f"{'-'.join((s.rpn_in_features[0], s.rpn_in_features[-1]))}, box head and "
                f"predictor on {s.post_nms_topk} proposals (post-NMS top-k); RoI align, NMS "
                f"and box decoding not counted")
    if isinstance(model.head, CenterNetHead):
        model.head(features, led)
        return ("simple feature pyramid + CenterNet head (heatmap, size and offset "
                "convolutions); peak decoding not counted")
    raise TypeError(f"no dense count for head {type(model.head).__name__}")
