"""The benchmark generator: determinism, disjoint splits, label sanity, decodable files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.synthetic import (DETECTION_CLASSES, RECOGNITION_CLASSES, DetectionConfig,
                                RecognitionConfig, SplitSizes, _motion, generate,
                                render_detection_video, render_recognition_clip, video_rng)
from pipeline.training_data import (HFLIP_LABELS, REVERSE_LABELS, augment_clip, dataset_meta,
                                    detection_videos, flip_detection, load_recognition_clips,
                                    read_video)

SMALL = DetectionConfig(width=128, height=96, frames=40)


def test_same_seed_same_video_and_splits_differ():
    a_frames, a_labels = render_detection_video(video_rng(3, "detection", "train", 0), SMALL)
    b_frames, b_labels = render_detection_video(video_rng(3, "detection", "train", 0), SMALL)
    assert all(np.array_equal(x, y) for x, y in zip(a_frames, b_frames))
    assert a_labels == b_labels
    c_frames, _ = render_detection_video(video_rng(3, "detection", "test", 0), SMALL)
    assert not np.array_equal(a_frames[0], c_frames[0])
    d_frames, _ = render_detection_video(video_rng(4, "detection", "train", 0), SMALL)
    assert not np.array_equal(a_frames[0], d_frames[0])


@pytest.mark.parametrize("index", range(4))
def test_labels_match_the_pixels(index):
    owners: list[np.ndarray] = []
    frames, labels = render_detection_video(video_rng(0, "detection", "val", index), SMALL,
                                            owner_maps=owners)
    h, w = SMALL.height, SMALL.width
    assert len(frames) == len(labels) == SMALL.frames
    assert frames[0].shape == (h, w, 3) and frames[0].dtype == np.uint8
    for frame_labels, owner in zip(labels, owners):
        labelled = {o["object_id"] for o in frame_labels}
        # every object seen in the frame is labelled, and nothing unseen is
        assert labelled == set(np.unique(owner[owner >= 0]).tolist())
        for o in frame_labels:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert 0 <= o["class_id"] < len(DETECTION_CLASSES)
            ys, xs = np.nonzero(owner == o["object_id"])
            # the object's visible pixels lie inside its box
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
            assert 0 < o["visible"] <= 1
            if not o["difficult"]:
                assert o["visible"] >= 0.4 and min(x1 - x0, y1 - y0) >= 8


def test_static_stretches_exist():
    """Long runs of frames where nothing but noise changes (what temporal methods exploit)."""
    frames, labels = render_detection_video(video_rng(1, "detection", "train", 2),
                                            DetectionConfig(width=128, height=96, frames=120))
    diffs = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, frames[1:])]
    boxes = [sorted((o["object_id"], o["box"]) for o in f) for f in labels]
    unchanged = [boxes[i] == boxes[i + 1] for i in range(len(boxes) - 1)]
    assert sum(unchanged) >= 20
    # static frames differ by sensor noise only; moving ones by more somewhere
    assert np.median(diffs) < 6


def test_motion_classes():
    """Each class is its motion: direction, rotation sense, scale trend, a bounce."""
    for i in range(20):
        for cls in RECOGNITION_CLASSES:
            x, y, size, angle = _motion(video_rng(0, "recognition", "train", i), cls, 16, 112)
            dx, dy = x[-1] - x[0], y[-1] - y[0]
            ds, da = size[-1] - size[0], angle[-1] - angle[0]
            if cls == "move_right":
                assert dx > 25
            elif cls == "move_left":
                assert dx < -25
            elif cls == "move_down":
                assert dy > 25
            elif cls == "move_up":
                assert dy < -25
            elif cls == "rotate_cw":
                assert da > 1.5
            elif cls == "rotate_ccw":
                assert da < -1.5
            elif cls == "approach":
                assert ds > 5
            elif cls == "recede":
                assert ds < -5
            elif cls == "bounce":
                vy = np.diff(y)
                assert (vy > 0).any() and (vy < 0).any()  # down, then back up
            assert np.all((x > 0) & (x < 112) & (y > 0) & (y < 112))


def test_label_augmentation_maps():
    assert np.array_equal(HFLIP_LABELS[HFLIP_LABELS], np.arange(len(RECOGNITION_CLASSES)))
    names = RECOGNITION_CLASSES
    assert names[REVERSE_LABELS[names.index("approach")]] == "recede"
    assert names[REVERSE_LABELS[names.index("bounce")]] == "bounce"
    assert names[HFLIP_LABELS[names.index("rotate_cw")]] == "rotate_ccw"
    clip = render_recognition_clip(video_rng(0, "recognition", "train", 0), RecognitionConfig(),
                                   "move_right")
    rng = np.random.default_rng(0)
    for _ in range(8):
        out, label = augment_clip(np.stack(clip), 0, rng)
        assert out.shape == (16, 112, 112, 3)
        assert names[label] in ("move_right", "move_left")
    frame = np.zeros((10, 20, 3), np.uint8)
    frame[:, :5] = 255
    flipped, boxes = flip_detection(frame, np.array([[0.0, 0.0, 5.0, 10.0]], np.float32))
    assert flipped[:, 15:].min() == 255 and boxes.tolist() == [[15.0, 0.0, 20.0, 10.0]]


def test_generate_writes_decodable_videos_and_parquet(tmp_path):
    import decord

    generate(tmp_path, "detection", seed=5, sizes=SplitSizes(1, 1, 1), det=SMALL)
    generate(tmp_path, "recognition", seed=5, sizes=SplitSizes(9, 0, 2))
    meta = dataset_meta(tmp_path / "detection")
    assert meta["seed"] == 5 and meta["classes"] == list(DETECTION_CLASSES)
    videos = detection_videos(tmp_path / "detection", "test")
    assert len(videos) == 1
    vr = decord.VideoReader(str(videos[0].path))
    assert len(vr) == SMALL.frames and vr[0].shape == (SMALL.height, SMALL.width, 3)
    # the file holds what the labels describe: the decoded frames are the rendered ones
    rendered, labels = render_detection_video(video_rng(5, "detection", "test", 0), SMALL)
    decoded = read_video(videos[0].path)
    mse = np.mean((decoded.astype(float) - np.stack(rendered).astype(float)) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) > 30  # PSNR in dB
    boxes = [lab.boxes.tolist() for lab in videos[0].labels]
    assert boxes == [[list(o["box"]) for o in f] for f in labels]
    rows = pq.read_table(tmp_path / "detection" / "test" / "labels.parquet").to_pylist()
    assert {r["class_name"] for r in rows} <= set(DETECTION_CLASSES)

    clips = load_recognition_clips(tmp_path / "recognition", "train")
    assert clips.clips.shape == (9, 16, 112, 112, 3)
    assert sorted(clips.labels.tolist()) == list(range(9))  # balanced
    assert json.loads((tmp_path / "recognition" / "dataset.json").read_text())["splits"] == \
        {"train": 9, "val": 0, "test": 2}
