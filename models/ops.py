"""Detection operators in plain PyTorch: box utilities, NMS, RoI align, anchors and the R-CNN
box transform. torchvision cannot be used here, so these follow the semantics of its ops
(``torchvision.ops.nms``, ``roi_align``) and of detectron2's ``Box2BoxTransform`` and
``DefaultAnchorGenerator``; tests check them against plain reference implementations.

Boxes are ``(x0, y0, x1, y1)`` in pixels. Box arithmetic runs in float32 whatever the feature
dtype (as detectron2 decodes boxes in float32).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

#: detectron2's clamp for predicted log-scale deltas: never grow a 16-pixel box past 1000 pixels.
SCALE_CLAMP = math.log(1000.0 / 16)


# --- boxes ---------------------------------------------------------------------------------

def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (len(a), len(b)); empty unions give 0."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(inter))


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Boxes clamped to an image of ``(height, width)`` (detectron2's ``Boxes.clip``)."""
    h, w = image_size
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)], dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """True for boxes whose width and height both exceed ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


# --- non-maximum suppression ---------------------------------------------------------------

def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of the kept boxes by decreasing score.

    A box is dropped when its IoU with a kept, higher-scoring box is above ``iou_threshold``
    (strictly, as torchvision). Exact and vectorised: box ``i`` of the score order is kept iff
    no kept box before it overlaps it; iterating that rule from "all kept" fixes one more
    position of the order per round, and stops as soon as nothing changes.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    b = boxes.float()[order]
    n = b.shape[0]
    suppresses = (box_iou(b, b) > iou_threshold).triu(diagonal=1)  # [j, i]: j before i
    keep = torch.ones(n, dtype=torch.bool, device=b.device)
    while True:
        new = ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS within each group (class or pyramid level) independently; kept indices by
    decreasing score, as detectron2's ``batched_nms``."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    kept = []
    for g in torch.unique(groups):
        idx = torch.nonzero(groups == g).flatten()
        kept.append(idx[nms(boxes[idx], scores[idx], iou_threshold)])
    keep = torch.cat(kept)
    return keep[torch.sort(scores[keep].float(), descending=True, stable=True).indices]


# --- RoI align -----------------------------------------------------------------------------

def _axis_weights(start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor,
                  size: int, pooled: int, max_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear weights of one axis of RoI align, summed over each bin's sample points.

    ``start``, ``bin_size``, ``grid`` are per RoI (R,). Returns ``weights`` (R, pooled, K) on the
    K feature rows starting at ``first`` (R,): ``out = weights_y @ window @ weights_x^T``
    then equals the per-sample bilinear average (the sampling is separable in y and x).
    """
    r = start.shape[0]
    k = torch.arange(max_grid, device=start.device, dtype=start.dtype)
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    # sample coordinates (R, pooled, G): bin start + (i + 0.5) * bin / grid
    g = grid.clamp(min=1).to(start.dtype)
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
             + (k[None, None, :] + 0.5) * (bin_size / g)[:, None, None])
    used = k[None, None, :] < grid[:, None, None]           # only the RoI's own grid
    inside = (coord >= -1.0) & (coord <= size)              # torchvision: outside -> 0
    c = coord.clamp(min=0)
    low = c.floor().clamp(max=size - 1)
    at_edge = low >= size - 1
    c = torch.where(at_edge, low, c)
    high = torch.where(at_edge, low, low + 1)
    frac = c - low
    w_low = (1 - frac) * (used & inside)
    w_high = frac * (used & inside)
    # the window covers the RoI's own samples (padding samples of a chunk would widen it)
    first = torch.where(used, low, float(size)).amin(dim=(1, 2)).clamp(max=size - 1).long()
    last = torch.where(used, high, 0.0).amax(dim=(1, 2)).long()
    span = int((last - first).clamp(min=0).max().item()) + 1 if r else 1
    weights = coord.new_zeros(r, pooled, span)
    weights.scatter_add_(2, (low.long() - first[:, None, None]).clamp(0, span - 1), w_low)
    weights.scatter_add_(2, (high.long() - first[:, None, None]).clamp(0, span - 1), w_high)
    return weights, first


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
              spatial_scale: float, sampling_ratio: int = 0, aligned: bool = True,
              max_window_elements: int = 1 << 24) -> torch.Tensor:
    """RoI align with torchvision's semantics.

    ``features`` (B, C, H, W); ``rois`` (R, 5) as ``(batch index, x0, y0, x1, y1)`` in input
    pixels. Each output bin averages bilinear samples on a regular grid of
    ``sampling_ratio`` points per axis (0: ``ceil(roi size / output size)``, adaptive);
    ``aligned`` shifts the box by half a pixel (detectron2's ROIAlignV2). Samples more than one
    pixel outside the map count as 0. Returns (R, C, out_h, out_w) in the features' dtype
    (computed in float32).
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    r = rois.shape[0]
    b, c, h, w = features.shape
    if r == 0:
        return features.new_zeros(0, c, out_h, out_w)
    boxes = rois[:, 1:].float() * spatial_scale - (0.5 if aligned else 0.0)
    roi_w = boxes[:, 2] - boxes[:, 0]
    roi_h = boxes[:, 3] - boxes[:, 1]
    if not aligned:  # legacy: force malformed RoIs to be 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    if sampling_ratio > 0:
        grid_h = torch.full((r,), sampling_ratio, device=rois.device)
        grid_w = grid_h.clone()
    else:
        grid_h = torch.ceil(roi_h / out_h).long()
        grid_w = torch.ceil(roi_w / out_w).long()
    count = (grid_h * grid_w).clamp(min=1).float()
    out = features.new_zeros(r, c, out_h, out_w)
    channels_last = features.permute(0, 2, 3, 1).contiguous()  # gathers read whole pixels
    # RoIs of similar window size go together, in chunks that bound the gathered windows.
    extent = (roi_h.clamp(min=0) + 2) * (roi_w.clamp(min=0) + 2)
    order = torch.argsort(extent)
    start = 0
    while start < r:
        stop = start + 1
        while stop < r and (stop + 1 - start) * float(extent[order[stop]]) * c \
                <= max_window_elements:
            stop += 1
        idx = order[start:stop]
        wy, y0 = _axis_weights(boxes[idx, 1], bin_h[idx], grid_h[idx], h, out_h,
                               int(grid_h[idx].max().clamp(min=1)))
        wx, x0 = _axis_weights(boxes[idx, 0], bin_w[idx], grid_w[idx], w, out_w,
                               int(grid_w[idx].max().clamp(min=1)))
        rows = (y0[:, None] + torch.arange(wy.shape[2], device=rois.device)).clamp(max=h - 1)
        cols = (x0[:, None] + torch.arange(wx.shape[2], device=rois.device)).clamp(max=w - 1)
        bi = rois[idx, 0].long()
        window = channels_last[bi[:, None, None], rows[:, :, None], cols[:, None, :]]  # n,Ky,Kx,C
        # sums in float32 whatever the features' dtype (torchvision's roi_align under autocast)
        window = window.float()
        n, ky = window.shape[:2]
        t = torch.matmul((wx / count[idx, None, None])[:, None], window)  # n, Ky, out_w, C
        pooled = torch.bmm(wy, t.reshape(n, ky, out_w * c))
        out[idx] = pooled.view(n, out_h, out_w, c).permute(0, 3, 1, 2).to(features.dtype)
        start = stop
    return out


# --- anchors and the box transform ----------------------------------------------------------

def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """(len(sizes) * len(ratios), 4) anchors centred on 0 (detectron2's
    ``generate_cell_anchors``: area ``size^2``, ``ratio = h / w``)."""
    out = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(cell: torch.Tensor, grid: tuple[int, int], stride: int, offset: float = 0.0
                 ) -> torch.Tensor:
    """Anchors over a feature grid, (H * W * A, 4) with the A anchors of a cell adjacent and
    cells in row-major order (the order of the RPN's flattened predictions)."""
    h, w = grid
    xs = torch.arange(w, dtype=torch.float32, device=cell.device) * stride + offset * stride
    ys = torch.arange(h, dtype=torch.float32, device=cell.device) * stride + offset * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell.reshape(1, -1, 4)).reshape(-1, 4)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor,
                 weights: tuple[float, float, float, float],
                 scale_clamp: float = SCALE_CLAMP) -> torch.Tensor:
    """R-CNN box transform: ``deltas`` (N, k*4) as (dx, dy, dw, dh) per box, applied to
    ``boxes`` (N, 4). Returns (N, k*4) boxes, computed in float32."""
    deltas = deltas.float()
    boxes = boxes.float()
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    cx = dx * widths[:, None] + ctr_x[:, None]
    cy = dy * heights[:, None] + ctr_y[:, None]
    pw = torch.exp(dw) * widths[:, None]
    ph = torch.exp(dh) * heights[:, None]
    out = torch.stack([cx - 0.5 * pw, cy - 0.5 * ph, cx + 0.5 * pw, cy + 0.5 * ph], dim=-1)
    return out.reshape(deltas.shape)
