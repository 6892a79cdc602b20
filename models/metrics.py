"""Accuracy metrics: detection mAP at IoU 0.5 (PASCAL VOC 2010+ / COCO AP50 style) and top-1.

mAP50, per class:

1. all detections of the class over all images, sorted by score (highest first; ties keep
   their input order);
2. each detection is compared with the ground-truth boxes of its class in its image and taken
   by the one it overlaps most; if that IoU is at least 0.5 it is a true positive, unless the
   box was already taken (a duplicate: false positive) or is marked *difficult* (ignored:
   neither true nor false positive, as VOC's flag); otherwise it is a false positive;
3. AP is the area under the precision-recall curve with precision made monotone
   (all-point interpolation), recall measured against the non-difficult boxes.

mAP50 is the mean AP over classes that have at least one non-difficult ground-truth box.
Boxes are (x0, y0, x1, y1) in continuous pixel coordinates (COCO's convention: area is
``(x1 - x0) * (y1 - y0)``, no VOC "+1").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IOU_THRESHOLD = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (n, 4) with every box in ``b`` (m, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC 2010+): area under the monotone precision envelope."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass
class ImageDetections:
    boxes: np.ndarray     # (n, 4)
    scores: np.ndarray    # (n,)
    labels: np.ndarray    # (n,)


@dataclass
class ImageTruth:
    boxes: np.ndarray     # (m, 4)
    labels: np.ndarray    # (m,)
    difficult: np.ndarray | None = None  # (m,) bool; None: none difficult


@dataclass
class MapResult:
    map50: float                      # NaN when no class has ground truth
    ap: dict[int, float]              # per class with ground truth
    positives: dict[int, int]         # non-difficult ground-truth boxes per class


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def map50(detections: Sequence[ImageDetections], truths: Sequence[ImageTruth],
          iou_threshold: float = IOU_THRESHOLD) -> MapResult:
    """mAP at ``iou_threshold`` over images (``detections[i]`` belongs to ``truths[i]``)."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection sets for {len(truths)} images")
    classes: set[int] = set()
    gt_by_class: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    positives: dict[int, int] = {}
    for i, t in enumerate(truths):
        labels = _np(t.labels).astype(np.int64).reshape(-1)
        boxes = _np(t.boxes).astype(np.float64).reshape(-1, 4)
        diff = (np.zeros(len(labels), bool) if t.difficult is None
                else _np(t.difficult).astype(bool).reshape(-1))
        for c in np.unique(labels):
            sel = labels == c
            gt_by_class.setdefault(int(c), {})[i] = (boxes[sel], diff[sel])
            positives[int(c)] = positives.get(int(c), 0) + int((~diff[sel]).sum())
            classes.add(int(c))
    dets_by_class: dict[int, list[tuple[float, int, int, np.ndarray]]] = {}
    order = 0
    for i, d in enumerate(detections):
        boxes = _np(d.boxes).astype(np.float64).reshape(-1, 4)
        for box, score, label in zip(boxes, _np(d.scores).reshape(-1), _np(d.labels).reshape(-1)):
            dets_by_class.setdefault(int(label), []).append((float(score), order, i, box))
            order += 1
    ap: dict[int, float] = {}
    for c in sorted(classes):
        npos = positives.get(c, 0)
        if npos == 0:
            continue
        dets = sorted(dets_by_class.get(c, []), key=lambda x: (-x[0], x[1]))
        taken = {i: np.zeros(len(g[0]), bool) for i, g in gt_by_class[c].items()}
        tp = np.zeros(len(dets))
        fp = np.zeros(len(dets))
        for k, (_, _, img, box) in enumerate(dets):
            gt = gt_by_class[c].get(img)
            if gt is None or len(gt[0]) == 0:
                fp[k] = 1
                continue
            ious = box_iou(box[None], gt[0])[0]
            j = int(np.argmax(ious))
            if ious[j] >= iou_threshold:
                if gt[1][j]:
                    continue  # difficult: ignored
                if not taken[img][j]:
                    tp[k] = 1
                    taken[img][j] = True
                else:
                    fp[k] = 1  # duplicate
            else:
                fp[k] = 1
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        recall = ctp / npos
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        ap[c] = average_precision(recall, precision)
    value = float(np.mean(list(ap.values()))) if ap else math.nan
    return MapResult(value, ap, {c: n for c, n in positives.items() if n})


def top1(predicted: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Share of predictions equal to the labels."""
    p, t = _np(predicted).reshape(-1), _np(labels).reshape(-1)
    if len(p) != len(t):
        raise ValueError(f"{len(p)} predictions for {len(t)} labels")
    return float((p == t).mean()) if len(t) else math.nan
