"""mAP50 and top-1 against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import (ImageDetections, ImageTruth, average_precision, box_iou, map50,
                            top1)


def det(boxes, scores, labels):
    return ImageDetections(np.array(boxes, float).reshape(-1, 4), np.array(scores, float),
                           np.array(labels, int))


def gt(boxes, labels, difficult=None):
    return ImageTruth(np.array(boxes, float).reshape(-1, 4), np.array(labels, int),
                      None if difficult is None else np.array(difficult, bool))


A = [0, 0, 10, 10]
B = [20, 20, 40, 40]


def test_box_iou():
    iou = box_iou(np.array([A]), np.array([A, [5, 0, 15, 10], [10, 10, 20, 20]]))
    assert iou[0].tolist() == pytest.approx([1.0, 50 / 150, 0.0])


def test_perfect_detection_is_one():
    assert map50([det([A], [0.9], [0])], [gt([A], [0])]).map50 == 1.0


def test_duplicate_is_a_false_positive():
    # img0 has A, img1 has B. Ranked: 0.9 on A (TP), 0.8 on A again (duplicate: FP), 0.7 on B
    # (TP). recall .5 .5 1, precision 1 .5 .667; envelope 1 1 .667 -> AP = .5*1 + .5*2/3
    r = map50([det([A, A], [0.9, 0.8], [0, 0]), det([B], [0.7], [0])],
              [gt([A], [0]), gt([B], [0])])
    assert r.map50 == pytest.approx(0.5 + 0.5 * 2 / 3)
    # the duplicate ranked last costs nothing (the envelope hides it)
    r = map50([det([A, A], [0.9, 0.1], [0, 0]), det([B], [0.7], [0])],
              [gt([A], [0]), gt([B], [0])])
    assert r.map50 == pytest.approx(1.0)


def test_missed_objects_cap_recall():
    r = map50([det([A], [0.9], [0]), det([], [], [])], [gt([A], [0]), gt([B], [0])])
    assert r.map50 == pytest.approx(0.5)
    assert r.positives == {0: 2}


def test_low_iou_is_a_false_positive_and_ranks_matter():
    # FP (IoU 1/3) ranked above the TP: precision at full recall is 1/2 -> AP .5
    r = map50([det([[5, 0, 15, 10], A], [0.9, 0.8], [0, 0])], [gt([A], [0])])
    assert r.map50 == pytest.approx(0.5)
    r = map50([det([[5, 0, 15, 10], A], [0.8, 0.9], [0, 0])], [gt([A], [0])])
    assert r.map50 == pytest.approx(1.0)


def test_several_classes_averaged_and_classes_without_truth_left_out():
    # class 0: perfect (AP 1); class 1: one of two found (AP .5); class 2: detections but no
    # ground truth (not in the mean); a detection with the wrong class is a FP of its class
    r = map50([det([A, B, A], [0.9, 0.8, 0.7], [0, 1, 2]), det([], [], [])],
              [gt([A, B], [0, 1]), gt([B], [1])])
    assert r.ap == pytest.approx({0: 1.0, 1: 0.5})
    assert r.map50 == pytest.approx(0.75)
    wrong = map50([det([A], [0.9], [1])], [gt([A], [0])])
    assert wrong.map50 == 0.0


def test_difficult_boxes_are_ignored():
    # a detection on a difficult box is neither TP nor FP, and the box is not a positive
    r = map50([det([B, A], [0.9, 0.8], [0, 0])], [gt([A, B], [0, 0], difficult=[False, True])])
    assert r.map50 == pytest.approx(1.0)
    assert r.positives == {0: 1}
    # missing a difficult box costs nothing
    r = map50([det([A], [0.9], [0])], [gt([A, B], [0, 0], difficult=[False, True])])
    assert r.map50 == pytest.approx(1.0)
    # only difficult truth: the class has no AP
    assert math.isnan(map50([det([A], [0.9], [0])], [gt([A], [0], [True])]).map50)


def test_a_detection_takes_its_best_overlap_only():
    # VOC rule: the second detection overlaps the taken box best (IoU .91) and the free box
    # less (.55, enough on its own): it is a duplicate, not a match of the free box
    big = [0, 0, 10, 20]
    r = map50([det([A, [0, 0, 10, 11]], [0.9, 0.8], [0, 0])], [gt([A, big], [0, 0])])
    iou = box_iou(np.array([[0, 0, 10, 11]]), np.array([A, big]))[0]
    assert iou[0] > iou[1] >= 0.5
    # ranked: TP, FP -> recall .5 .5, precision 1 .5 -> AP .5
    assert r.map50 == pytest.approx(0.5)


def test_average_precision_all_points():
    # VOC 2010+ all-point interpolation on a zig-zag curve
    rec = np.array([0.2, 0.4, 0.4, 0.6, 0.8])
    prec = np.array([1.0, 1.0, 0.67, 0.75, 0.5])
    assert average_precision(rec, prec) == pytest.approx(0.2 + 0.2 + 0.2 * 0.75 + 0.2 * 0.5)


def test_top1():
    assert top1([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        top1([1], [1, 2])
