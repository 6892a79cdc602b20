"""The two-stage (Faster R-CNN) head of the published ViTDet checkpoints, in plain PyTorch.

A port of detectron2's test-time path with its module and parameter names, so that a
detectron2 state dict's ``proposal_generator.*`` and ``roi_heads.*`` keys load unchanged under
``head.``:

- ``proposal_generator`` (``RPN``): ``rpn_head`` is ``StandardRPNHead`` with ViTDet's two 3x3
  convolutions (``conv.conv0``, ``conv.conv1``), ``objectness_logits`` and ``anchor_deltas``;
  anchors of sizes 32..512 (one per level), ratios 0.5/1/2, on p2..p6 with offset 0; per level
  the ``pre_nms_topk`` best anchors, clipped, empty boxes dropped, NMS 0.7 per level, the best
  ``post_nms_topk`` kept.
- ``roi_heads`` (``StandardROIHeads``): RoI align (ROIAlignV2: aligned, adaptive sampling) on
  p2..p5 with detectron2's level assignment (canonical box 224 px on level 4); ``box_head`` is
  ``FastRCNNConvFCHead`` with four 3x3 convolutions with LayerNorm and one fc (ViTDet);
  ``box_predictor`` is ``FastRCNNOutputLayers`` with class-specific box regression, softmax
  scores, score threshold, per-class NMS 0.5 and the top 100 detections.

Settings follow detectron2's ViTDet configs (``projects/ViTDet/configs/common`` and the
ImageNet VID config of the Eventful Transformers code, which keeps 300 proposals at test time:
pass ``post_nms_topk=300`` for it). The p6 level is detectron2's ``LastLevelMaxPool`` (a
1x1 max-pool with stride 2 of p5), which has no parameters and is computed here.

Compute: every convolution and linear layer the head runs is counted in the ledger's ``head``
category, the box head per stream on that stream's proposals. RoI align, NMS and box decoding
are not counted (interpolation and sorting, not multiply-accumulates of the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import Conv2dNorm, Detections, LayerNorm2d, counted
from .layers import conv_macs
from .ledger import Ledger
from .ops import (apply_deltas, batched_nms, cell_anchors, clip_boxes, grid_anchors, nonempty,
                  roi_align)

ImageSizes = tuple[int, int] | Sequence[tuple[int, int]]


@dataclass(frozen=True)
class RCNNSettings:
    """Test-time settings (detectron2 names in comments)."""

    in_channels: int = 256
    rpn_in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6")
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)   # one size per level
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    rpn_conv_dims: tuple[int, ...] = (-1, -1)                    # ViTDet: two 3x3 convs
    rpn_nms_threshold: float = 0.7
    pre_nms_topk: int = 1000                                     # per level, test
    post_nms_topk: int = 1000                                    # per image, test
    min_box_size: float = 0.0
    box_in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5")
    pooler_resolution: int = 7
    sampling_ratio: int = 0
    canonical_box_size: int = 224
    canonical_level: int = 4
    box_conv_dims: tuple[int, ...] = (256, 256, 256, 256)
    box_fc_dims: tuple[int, ...] = (1024,)
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    rpn_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    class_agnostic_boxes: bool = False
    nms_threshold: float = 0.5                                   # test_nms_thresh
    max_detections: int = 100                                    # test_topk_per_image


class Conv2dNormReLU(Conv2dNorm):
    """detectron2's ``Conv2d`` with a norm and a ReLU (keys ``weight``, ``bias``, ``norm.*``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class StandardRPNHead(nn.Module):
    def __init__(self, in_channels: int, num_anchors: int, conv_dims: Sequence[int] = (-1, -1)):
        super().__init__()
        channels = in_channels
        convs = []
        for dim in conv_dims:
            out = channels if dim == -1 else dim
            convs.append(Conv2dNormReLU(channels, out, 3, padding=1))
            channels = out
        # detectron2 keeps a single conv unnamed (``conv``) and names several ``conv.conv<k>``
        if len(convs) == 1:
            self.conv: nn.Module = convs[0]
        else:
            self.conv = nn.Sequential()
            for k, conv in enumerate(convs):
                self.conv.add_module(f"conv{k}", conv)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor], ledger: Ledger | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for x in features:
            t = counted(self.conv, x, ledger)
            logits.append(counted(self.objectness_logits, t, ledger))
            deltas.append(counted(self.anchor_deltas, t, ledger))
        return logits, deltas


class RPN(nn.Module):
    """Region proposals from the pyramid (detectron2's ``RPN`` at test time)."""

    def __init__(self, s: RCNNSettings):
        super().__init__()
        self.settings = s
        self.strides = [2 ** int(name[1:]) for name in s.rpn_in_features]
        self.rpn_head = StandardRPNHead(s.in_channels, len(s.aspect_ratios), s.rpn_conv_dims)
        # float32 anchors built on demand: buffers would be cast to bf16 with the model
        self._cells = [cell_anchors([size], s.aspect_ratios) for size in s.anchor_sizes]
        self._anchor_cache: dict[tuple, torch.Tensor] = {}

    def anchors(self, level: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (level, tuple(grid), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = grid_anchors(self._cells[level].to(device), grid,
                                                   self.strides[level], self.settings.anchor_offset)
        return self._anchor_cache[key]

    def raw(self, features: dict[str, torch.Tensor], ledger: Ledger | None = None
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Objectness (B, H*W*A) and deltas (B, H*W*A, 4) per level, anchors of a cell
        adjacent (detectron2's flattening)."""
        maps = [features[f] for f in self.settings.rpn_in_features]
        logits, deltas = self.rpn_head(maps, ledger)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2)
                  .flatten(1, -2) for x in deltas]
        return logits, deltas

    def forward(self, features: dict[str, torch.Tensor], image_sizes: list[tuple[int, int]],
                ledger: Ledger | None = None) -> list[torch.Tensor]:
        """Proposal boxes (float32, by decreasing objectness) per image."""
        s = self.settings
        logits, deltas = self.raw(features, ledger)
        b = logits[0].shape[0]
        boxes_lv, scores_lv, level_ids = [], [], []
        for level, (lg, dl, name) in enumerate(zip(logits, deltas, s.rpn_in_features)):
            grid = tuple(features[name].shape[-2:])
            anchors = self.anchors(level, grid, lg.device)
            k = min(s.pre_nms_topk, lg.shape[1])
            top, idx = lg.float().sort(dim=1, descending=True, stable=True)
            top, idx = top[:, :k], idx[:, :k]
            sel_deltas = torch.gather(dl, 1, idx[..., None].expand(-1, -1, 4))
            boxes = apply_deltas(sel_deltas.reshape(-1, 4), anchors[idx.reshape(-1)],
                                 s.rpn_reg_weights).view(b, k, 4)
            boxes_lv.append(boxes)
            scores_lv.append(top)
            level_ids.append(torch.full((k,), level, dtype=torch.long, device=lg.device))
        boxes_all = torch.cat(boxes_lv, dim=1)
        scores_all = torch.cat(scores_lv, dim=1)
        levels = torch.cat(level_ids)
        out = []
        for i in range(b):
            boxes, scores, lvl = boxes_all[i], scores_all[i], levels
            finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            boxes, scores, lvl = boxes[finite], scores[finite], lvl[finite]
            boxes = clip_boxes(boxes, image_sizes[i])
            keep = nonempty(boxes, s.min_box_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, s.rpn_nms_threshold)[: s.post_nms_topk]
            out.append(boxes[keep])
        return out


class FastRCNNConvFCHead(nn.Module):
    """Convolutions (norm, ReLU) then fully connected layers (ReLU) on pooled RoI features,
    named ``conv1..`` and ``fc1..`` as detectron2."""

    def __init__(self, channels: int, resolution: int, conv_dims: Sequence[int],
                 fc_dims: Sequence[int]):
        super().__init__()
        self.conv_names, self.fc_names = [], []
        for k, dim in enumerate(conv_dims):
            self.add_module(f"conv{k + 1}", Conv2dNormReLU(channels, dim, 3, padding=1,
                                                           bias=False, norm=LayerNorm2d(dim)))
            self.conv_names.append(f"conv{k + 1}")
            channels = dim
        features = channels * resolution * resolution
        for k, dim in enumerate(fc_dims):
            self.add_module(f"fc{k + 1}", nn.Linear(features, dim))
            self.fc_names.append(f"fc{k + 1}")
            features = dim
        self.resolution = resolution
        self.output_size = features

    def forward(self, x: torch.Tensor, ledger: Ledger | None = None,
                per_stream: torch.Tensor | None = None) -> torch.Tensor:
        """``per_stream`` (B,): how many of the RoIs in ``x`` belong to each stream."""
        for name in self.conv_names:
            conv = getattr(self, name)
            x = conv(x)
            if ledger is not None:
                one = torch.empty(1, conv.out_channels, self.resolution, self.resolution,
                                  device="meta")
                ledger.add(per_stream * conv_macs(conv, one), "head")
        x = x.flatten(1)
        for name in self.fc_names:
            fc = getattr(self, name)
            x = F.relu(fc(x))
            if ledger is not None:
                ledger.linear(fc, per_stream, "head")
        return x


class FastRCNNOutputLayers(nn.Module):
    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_features, num_classes + 1)  # last: background
        self.bbox_pred = nn.Linear(in_features, 4 * (1 if class_agnostic else num_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor, ledger: Ledger | None = None,
                per_stream: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if ledger is not None:
            ledger.linear(self.cls_score, per_stream, "head")
            ledger.linear(self.bbox_pred, per_stream, "head")
        return self.cls_score(x), self.bbox_pred(x)


class StandardROIHeads(nn.Module):
    """Box branch of detectron2's ``StandardROIHeads`` at test time."""

    def __init__(self, s: RCNNSettings, num_classes: int):
        super().__init__()
        self.settings = s
        self.box_head = FastRCNNConvFCHead(s.in_channels, s.pooler_resolution, s.box_conv_dims,
                                           s.box_fc_dims)
        self.box_predictor = FastRCNNOutputLayers(self.box_head.output_size, num_classes,
                                                  s.class_agnostic_boxes)
        self.levels = [int(name[1:]) for name in s.box_in_features]

    def pool(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor]
             ) -> torch.Tensor:
        """ROIPooler: each box on the level ``floor(4 + log2(sqrt(area) / 224))`` clamped to
        the available levels, RoI-aligned there."""
        s = self.settings
        boxes = torch.cat(proposals)
        batch = torch.cat([torch.full((len(p),), i, dtype=boxes.dtype, device=boxes.device)
                           for i, p in enumerate(proposals)])
        rois = torch.cat([batch[:, None], boxes], dim=1)
        first = features[s.box_in_features[0]]
        out = first.new_zeros(len(rois), first.shape[1], s.pooler_resolution, s.pooler_resolution)
        if not len(rois):
            return out
        size = torch.sqrt(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0))
        level = torch.floor(s.canonical_level + torch.log2(size / s.canonical_box_size + 1e-8))
        level = level.clamp(min=self.levels[0], max=self.levels[-1]).long()
        for lv, name in zip(self.levels, s.box_in_features):
            idx = torch.nonzero(level == lv).flatten()
            if len(idx):
                out[idx] = roi_align(features[name], rois[idx], s.pooler_resolution,
                                     1.0 / 2 ** lv, s.sampling_ratio, aligned=True)
        return out

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], score_threshold: float,
                ledger: Ledger | None = None) -> list[Detections]:
        s = self.settings
        counts = torch.tensor([len(p) for p in proposals], dtype=torch.float64, device="cpu")
        x = self.box_head(self.pool(features, proposals), ledger, counts)
        logits, deltas = self.box_predictor(x, ledger, counts)
        probs = F.softmax(logits.float(), dim=-1)
        boxes = apply_deltas(deltas, torch.cat(proposals), s.box_reg_weights) if len(x) else \
            deltas.float()
        out, start = [], 0
        for i, p in enumerate(proposals):
            n = len(p)
            out.append(self._postprocess(boxes[start:start + n], probs[start:start + n],
                                         image_sizes[i], score_threshold))
            start += n
        return out

    def _postprocess(self, boxes: torch.Tensor, probs: torch.Tensor, image_size: tuple[int, int],
                     score_threshold: float) -> Detections:
        """detectron2's ``fast_rcnn_inference_single_image``."""
        s = self.settings
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        boxes, probs = boxes[finite], probs[finite]
        scores = probs[:, :-1]
        per_box = boxes.shape[1] // 4  # 1 (class-agnostic) or one box per class
        boxes = clip_boxes(boxes.reshape(-1, 4), image_size).view(len(scores), per_box, 4)
        mask = scores > score_threshold
        inds = torch.nonzero(mask)          # (roi, class)
        boxes = boxes[inds[:, 0], 0] if boxes.shape[1] == 1 else boxes[mask]
        scores = scores[mask]
        keep = batched_nms(boxes, scores, inds[:, 1], s.nms_threshold)[: s.max_detections]
        return Detections(boxes[keep], scores[keep], inds[keep, 1])


class RCNNHead(nn.Module):
    """RPN + RoI box head. Called by :class:`~models.detector.ViTDetector` with the pyramid
    (p2..p5; p6 is added here) and the size of each image in input pixels (boxes are clipped
    to it, as detectron2 clips to the image before padding)."""

    def __init__(self, num_classes: int, settings: RCNNSettings | None = None):
        super().__init__()
        self.settings = settings or RCNNSettings()
        self.num_classes = num_classes
        self.proposal_generator = RPN(self.settings)
        self.roi_heads = StandardROIHeads(self.settings, num_classes)

    @staticmethod
    def with_p6(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "p6" in features:
            return features
        return {**features, "p6": F.max_pool2d(features["p5"], kernel_size=1, stride=2)}

    def forward(self, features: dict[str, torch.Tensor], image_size: ImageSizes,
                ledger: Ledger | None = None, score_threshold: float = 0.05) -> list[Detections]:
        features = self.with_p6(features)
        b = next(iter(features.values())).shape[0]
        sizes = _per_image(image_size, b)
        proposals = self.proposal_generator(features, sizes, ledger)
        return self.roi_heads(features, proposals, sizes, score_threshold, ledger)

    def forward_raw(self, features: dict[str, torch.Tensor], ledger: Ledger | None = None,
                    proposals_per_image: int | None = None) -> dict[str, torch.Tensor]:
        """The head up to its raw outputs, without the data-dependent steps (proposal
        selection, NMS, decoding): the RPN on every level, then the box head and predictor on
        ``proposals_per_image`` RoIs per image (default: ``post_nms_topk``, the number a dense
        frame normally yields). Runs on the meta device, for counting."""
        s = self.settings
        features = self.with_p6(features)
        logits, deltas = self.proposal_generator.raw(features, ledger)
        n = s.post_nms_topk if proposals_per_image is None else proposals_per_image
        first = features[s.box_in_features[0]]
        b = first.shape[0]
        pooled = first.new_zeros(b * n, first.shape[1], s.pooler_resolution, s.pooler_resolution)
        counts = torch.full((b,), float(n), dtype=torch.float64, device="cpu")  # ledger counts
        x = self.roi_heads.box_head(pooled, ledger, counts)
        cls, box = self.roi_heads.box_predictor(x, ledger, counts)
        return {"objectness": torch.cat(logits, 1), "anchor_deltas": torch.cat(deltas, 1),
                "class_logits": cls, "box_deltas": box}


def _per_image(image_size: ImageSizes, batch: int) -> list[tuple[int, int]]:
    if len(image_size) == 2 and all(isinstance(v, (int, float)) for v in image_size):
        return [(int(image_size[0]), int(image_size[1]))] * batch
    sizes = [(int(h), int(w)) for h, w in image_size]
    if len(sizes) != batch:
        raise ValueError(f"{len(sizes)} image sizes for a batch of {batch}")
    return sizes


def build_rcnn_head(num_classes: int, **options) -> RCNNHead:
    """The ViTDet Faster R-CNN head; ``options`` override :class:`RCNNSettings` fields
    (e.g. ``post_nms_topk=300`` for the ImageNet VID checkpoints)."""
    fields = RCNNSettings.__dataclass_fields__
    unknown = sorted(set(options) - set(fields))
    if unknown:
        from .registry import ModelError

        raise ModelError(f"unknown rcnn options: {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(fields))}")
    tuples = {k: tuple(v) for k, v in options.items() if isinstance(v, list)}
    return RCNNHead(num_classes, RCNNSettings(**{**options, **tuples}))


__all__ = ["RCNNHead", "RCNNSettings", "build_rcnn_head"]
