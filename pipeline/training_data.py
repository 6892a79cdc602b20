"""Reading generated benchmark data (``pipeline/synthetic.py``) for training and evaluation.

Videos are decoded with decord (the pipeline's ``decode.backend: decord``; its default PyAV
backend gives the same pixels, tests/operators/test_decord_backend.py), so models train on the
same compressed frames they are evaluated and run on. Splits are small enough to hold decoded
in memory (the default detection training split is about 1.2 GB of uint8 frames).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .synthetic import DETECTION_CLASSES, RECOGNITION_CLASSES


class DatasetError(ValueError):
    """Generated data missing or incomplete (a user can fix it by running ``generate``)."""


def dataset_meta(root: str | Path) -> dict:
    """The ``dataset.json`` of a generated task folder (``OUT/<task>``)."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{root}: no dataset.json (not generated, or generation did not "
                           f"finish); run `vidprune generate --out DIR` first")
    return json.loads(path.read_text())


def split_dir(root: str | Path, split: str) -> Path:
    d = Path(root) / split
    if not (d / "videos.parquet").is_file() or not (d / "labels.parquet").is_file():
        raise DatasetError(f"{d}: split {split!r} is missing (videos.parquet, labels.parquet)")
    return d


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video, (T, H, W, 3) uint8 RGB."""
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    return vr.get_batch(list(range(len(vr)))).asnumpy()


@dataclass
class FrameLabels:
    """Ground truth of one frame: boxes (n, 4) x0 y0 x1 y1 pixels, class ids, difficult."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass
class DetectionVideo:
    path: Path
    frames: int
    labels: list[FrameLabels]   # one per frame


def detection_videos(root: str | Path, split: str, limit: int | None = None
                     ) -> list[DetectionVideo]:
    """The videos of a detection split with their per-frame ground truth (not decoded)."""
    d = split_dir(root, split)
    videos = pq.read_table(d / "videos.parquet").to_pylist()[:limit]
    rows: dict[tuple[str, int], list[dict]] = {}
    for r in pq.read_table(d / "labels.parquet").to_pylist() if videos else []:
        rows.setdefault((r["video"], r["frame"]), []).append(r)
    out = []
    for v in videos:
        per_frame = []
        for t in range(v["frames"]):
            objs = rows.get((v["video"], t), [])
            per_frame.append(FrameLabels(
                np.array([[o["x0"], o["y0"], o["x1"], o["y1"]] for o in objs],
                         np.float32).reshape(-1, 4),
                np.array([o["class_id"] for o in objs], np.int64),
                np.array([o["difficult"] for o in objs], bool)))
        out.append(DetectionVideo(d / v["video"], int(v["frames"]), per_frame))
    return out


@dataclass
class DetectionFrames:
    """Decoded frames of a split (every ``every``-th frame) with their ground truth."""

    frames: np.ndarray              # (M, H, W, 3) uint8
    labels: list[FrameLabels]


def load_detection_frames(root: str | Path, split: str, every: int = 1,
                          limit: int | None = None) -> DetectionFrames:
    frames, labels = [], []
    for v in detection_videos(root, split, limit):
        pix = read_video(v.path)
        if len(pix) != v.frames:
            raise DatasetError(f"{v.path}: decoded {len(pix)} frames, labels say {v.frames}")
        frames.append(pix[::every])
        labels.extend(v.labels[::every])
    return DetectionFrames(np.concatenate(frames), labels)


@dataclass
class RecognitionClips:
    paths: list[Path]
    labels: np.ndarray              # (M,) class ids
    clips: np.ndarray | None = None  # (M, T, H, W, 3) uint8 when decoded


def load_recognition_clips(root: str | Path, split: str, decode: bool = True,
                           limit: int | None = None) -> RecognitionClips:
    d = split_dir(root, split)
    rows = pq.read_table(d / "labels.parquet").to_pylist()[:limit]
    paths = [d / r["video"] for r in rows]
    labels = np.array([r["class_id"] for r in rows], dtype=np.int64)
    clips = np.stack([read_video(p) for p in paths]) if decode and rows else None
    return RecognitionClips(paths, labels, clips)


def trainable_boxes(labels: FrameLabels, min_side_px: float = 4.0) -> np.ndarray:
    """Boxes used as training targets: all but slivers at the frame edge. Difficult ones
    (mostly hidden) stay: the detector should still find what it can see of them."""
    wh = labels.boxes[:, 2:] - labels.boxes[:, :2]
    return wh.min(axis=1) >= min_side_px if len(wh) else np.zeros(0, bool)


# --- augmentation ---------------------------------------------------------------------------

def flip_detection(frame: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a frame left-right, with its boxes. (All detection classes are mirror-symmetric
    in shape; their textures are class-specific, not handedness-specific.)"""
    w = frame.shape[1]
    out = boxes.copy()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return frame[:, ::-1], out


def _label_map(pairs: list[tuple[str, str]]) -> np.ndarray:
    index = {c: i for i, c in enumerate(RECOGNITION_CLASSES)}
    m = np.arange(len(RECOGNITION_CLASSES))
    for a, b in pairs:
        m[index[a]], m[index[b]] = index[b], index[a]
    return m


#: A left-right mirror turns rightward motion leftward and clockwise anticlockwise.
HFLIP_LABELS = _label_map([("move_right", "move_left"), ("rotate_cw", "rotate_ccw")])
#: Played backwards, each motion becomes its opposite; a bounce stays a bounce (ballistic
#: motion is time-reversible; only the small energy loss at the floor turns into a gain).
REVERSE_LABELS = _label_map([("move_right", "move_left"), ("move_up", "move_down"),
                             ("rotate_cw", "rotate_ccw"), ("approach", "recede")])


def augment_clip(clip: np.ndarray, label: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, int]:
    """Random mirror and time reversal of a (T, H, W, 3) clip, with the label they imply."""
    if rng.random() < 0.5:
        clip, label = clip[:, :, ::-1], int(HFLIP_LABELS[label])
    if rng.random() < 0.5:
        clip, label = clip[::-1], int(REVERSE_LABELS[label])
    return clip, label


__all__ = ["DETECTION_CLASSES", "RECOGNITION_CLASSES", "DatasetError", "DetectionFrames",
           "DetectionVideo", "FrameLabels", "RecognitionClips", "augment_clip", "dataset_meta",
           "detection_videos", "flip_detection", "load_detection_frames",
           "load_recognition_clips", "read_video", "trainable_boxes"]
