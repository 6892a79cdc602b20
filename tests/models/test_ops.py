"""NMS, RoI align and the box transform against plain reference implementations."""

import math

import pytest
import torch

from models.ops import (apply_deltas, batched_nms, box_iou, cell_anchors, clip_boxes,
                        grid_anchors, nms, roi_align)


def random_boxes(n: int, size: float = 100.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 1
    return torch.cat([xy, xy + wh], dim=1)


def reference_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_nms(boxes, scores, threshold) -> list[int]:
    """The textbook O(n^2) loop: take the best remaining box, drop everything overlapping it."""
    remaining = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))
    keep = []
    while remaining:
        best = remaining.pop(0)
        keep.append(best)
        remaining = [i for i in remaining
                     if reference_iou(boxes[best].tolist(), boxes[i].tolist()) <= threshold]
    return keep


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_reference_loop(threshold):
    boxes = random_boxes(300, seed=1)
    scores = torch.rand(300, generator=torch.Generator().manual_seed(2))
    keep = nms(boxes, scores, threshold)
    assert keep.tolist() == reference_nms(boxes, scores, threshold)
    assert 0 < len(keep) < 300  # the case is not trivial


def test_nms_edge_cases():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    box = torch.tensor([[0.0, 0, 10, 10]])
    # identical boxes: only the best survives; IoU exactly at the threshold is kept
    assert nms(box.repeat(3, 1), torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [1]
    half = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 5]])  # IoU 0.5
    assert nms(half, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0, 1]
    assert nms(half, torch.tensor([1.0, 0.5]), 0.49).tolist() == [0]


def test_batched_nms_is_nms_per_group():
    boxes = random_boxes(200, seed=3)
    scores = torch.rand(200, generator=torch.Generator().manual_seed(4))
    groups = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(5))
    keep = batched_nms(boxes, scores, groups, 0.5)
    expected = []
    for g in range(4):
        idx = torch.nonzero(groups == g).flatten()
        expected += [int(idx[i]) for i in reference_nms(boxes[idx], scores[idx], 0.5)]
    assert sorted(keep.tolist()) == sorted(expected)
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])  # by decreasing score


def test_box_iou_matches_reference():
    a, b = random_boxes(7, seed=6), random_boxes(5, seed=7)
    iou = box_iou(a, b)
    for i in range(7):
        for j in range(5):
            assert iou[i, j].item() == pytest.approx(reference_iou(a[i].tolist(), b[j].tolist()),
                                                     abs=1e-6)


def reference_bilinear(fmap, y, x) -> torch.Tensor:
    """One bilinear sample of a (C, H, W) map, with torchvision's border rules."""
    c, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(c, dtype=torch.float64)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    f = fmap.double()
    return ((1 - ly) * (1 - lx) * f[:, y0, x0] + (1 - ly) * lx * f[:, y0, x1]
            + ly * (1 - lx) * f[:, y1, x0] + ly * lx * f[:, y1, x1])


def reference_roi_align(features, rois, out, scale, sampling_ratio, aligned):
    """Every output bin averages bilinear samples taken by hand, one at a time."""
    result = torch.zeros(len(rois), features.shape[1], out, out, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for r, (bi, x0, y0, x1, y1) in enumerate(rois.tolist()):
        sx, sy = x0 * scale - offset, y0 * scale - offset
        rw, rh = x1 * scale - offset - sx, y1 * scale - offset - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / out, rh / out
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / out)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / out)
        count = max(gh * gw, 1)
        for ph in range(out):
            for pw in range(out):
                acc = torch.zeros(features.shape[1], dtype=torch.float64)
                for iy in range(gh):
                    y = sy + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sx + pw * bw + (ix + 0.5) * bw / gw
                        acc += reference_bilinear(features[int(bi)], y, x)
                result[r, :, ph, pw] = acc / count
    return result


@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (2, True), (0, False)])
def test_roi_align_matches_per_sample_reference(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(8)
    features = torch.randn(2, 3, 12, 16, generator=g)
    rois = torch.tensor([
        [0, 4.0, 4.0, 40.0, 30.0],     # ordinary box
        [1, -10.0, -6.0, 20.0, 12.0],  # partly outside the map
        [0, 50.0, 30.0, 70.0, 52.0],   # reaching past the bottom-right edge
        [1, 10.0, 10.0, 10.5, 30.0],   # very thin
        [0, 3.0, 3.0, 3.0, 3.0],       # empty
        [1, 0.0, 0.0, 64.0, 48.0],     # the whole map
    ])
    got = roi_align(features, rois, 3, spatial_scale=0.25, sampling_ratio=sampling_ratio,
                    aligned=aligned)
    want = reference_roi_align(features, rois, 3, 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_roi_align_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(9)
    features = torch.randn(1, 4, 20, 20, generator=g)
    boxes = random_boxes(40, size=70, seed=10)
    rois = torch.cat([torch.zeros(40, 1), boxes], dim=1)
    whole = roi_align(features, rois, 7, 0.25)
    chunked = roi_align(features, rois, 7, 0.25, max_window_elements=1)  # one RoI per chunk
    torch.testing.assert_close(whole, chunked)


def test_anchors_and_box_transform():
    cell = cell_anchors([32], [0.5, 1.0, 2.0])
    # area is size^2 and ratio is h / w for every anchor
    wh = cell[:, 2:] - cell[:, :2]
    torch.testing.assert_close(wh.prod(1), torch.full((3,), 32.0 ** 2))
    torch.testing.assert_close(wh[:, 1] / wh[:, 0], torch.tensor([0.5, 1.0, 2.0]))
    anchors = grid_anchors(cell, (2, 3), stride=8)
    assert anchors.shape == (2 * 3 * 3, 4)
    # row-major cells with the three anchors of a cell adjacent: cell (y=1, x=2) is index 5
    torch.testing.assert_close(anchors[15], cell[0] + torch.tensor([16.0, 8.0, 16.0, 8.0]))
    # zero deltas give the boxes back; dx shifts by a fraction of the width (weights divide)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(apply_deltas(torch.zeros(1, 8), boxes, (10, 10, 5, 5)),
                               boxes.repeat(1, 2))
    moved = apply_deltas(torch.tensor([[10.0, 0.0, 5 * math.log(2), 0.0]]), boxes, (10, 10, 5, 5))
    torch.testing.assert_close(moved, torch.tensor([[20.0, 20.0, 60.0, 60.0]]))
    # huge log-scales are clamped
    big = apply_deltas(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), boxes, (1, 1, 1, 1))
    assert torch.isfinite(big).all() and (big[0, 2] - big[0, 0]) == pytest.approx(20 * 1000 / 16)
    torch.testing.assert_close(clip_boxes(torch.tensor([[-5.0, 3.0, 50.0, 90.0]]), (40, 30)),
                               torch.tensor([[0.0, 3.0, 30.0, 40.0]]))
