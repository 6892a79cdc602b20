"""Labelled benchmark videos, generated deterministically from a seed.

Two tasks:

- **detection**: textured objects of five classes (shape and texture tell them apart) over a
  textured background larger than the view, with objects entering and leaving, occluding each
  other and a foreground pillar, changing scale, camera pans, lighting changes, sensor noise,
  and long static stretches (the temporal redundancy pruning methods exploit). Per-frame boxes.
- **recognition**: short clips in which one object performs a motion; the motion is the class
  (direction, rotation sense, approach/recede, bounce), so no single frame tells the classes
  apart. One label per clip.

Every video is rendered in numpy from its own ``numpy.random.SeedSequence([seed, task, split,
index])``, so splits never share a seed and any one video can be re-made alone. Videos are
ordinary H.264 MP4 (yuv420p, written with PyAV); labels are Parquet::

    OUT/<task>/dataset.json                    what was generated, with which parameters
    OUT/<task>/<split>/videos/<name>.mp4
    OUT/<task>/<split>/videos.parquet          one row per video (frames, size, seed)
    OUT/<task>/<split>/labels.parquet          detection: one row per object per frame
                                               recognition: one row per clip
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: Bumped when a task's videos change for the same seed (recognition 2: larger actor and
#: motions, fewer distractors, no clutter lines, so the motion is the dominant signal).
GENERATOR_VERSION = {"detection": 1, "recognition": 2}
TASKS = ("detection", "recognition")
SPLITS = ("train", "val", "test")
_TASK_ID = {"detection": 1, "recognition": 2}
_SPLIT_ID = {"train": 1, "val": 2, "test": 3}

DETECTION_CLASSES = ("disc", "square", "triangle", "star", "cross")
RECOGNITION_CLASSES = ("move_right", "move_left", "move_up", "move_down", "rotate_cw",
                       "rotate_ccw", "approach", "recede", "bounce")

# An object is "difficult" (ignored by mAP, as VOC's flag) when less than this share of it is
# visible in the frame, or its box is smaller than this many pixels on a side.
MIN_VISIBLE = 0.4
MIN_BOX_PX = 8.0

DETECTION_LABEL_SCHEMA = pa.schema([
    ("video", pa.string()), ("frame", pa.int32()), ("object_id", pa.int32()),
    ("class_id", pa.int32()), ("class_name", pa.string()),
    ("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()),
    ("visible", pa.float32()), ("difficult", pa.bool_()),
])
RECOGNITION_LABEL_SCHEMA = pa.schema([
    ("video", pa.string()), ("class_id", pa.int32()), ("class_name", pa.string()),
])
VIDEO_SCHEMA = pa.schema([
    ("video", pa.string()), ("frames", pa.int32()), ("width", pa.int32()),
    ("height", pa.int32()), ("fps", pa.float32()), ("seed", pa.string()),
])


@dataclass(frozen=True)
class DetectionConfig:
    width: int = 256
    height: int = 192
    frames: int = 120
    fps: float = 24.0
    min_objects: int = 2
    max_objects: int = 5


@dataclass(frozen=True)
class RecognitionConfig:
    size: int = 112
    frames: int = 16
    fps: float = 24.0


@dataclass(frozen=True)
class SplitSizes:
    train: int
    val: int
    test: int

    def items(self) -> list[tuple[str, int]]:
        return [(s, getattr(self, s)) for s in SPLITS]


DEFAULT_SIZES = {"detection": SplitSizes(80, 12, 12), "recognition": SplitSizes(3600, 450, 450)}


def video_rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    """The generator of one video: disjoint streams for every (seed, task, split, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, _TASK_ID[task], _SPLIT_ID[split],
                                                         index]))


# --- drawing ------------------------------------------------------------------------------

def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = cells + 1, max(2, int(round(cells * w / h))) + 1
    coarse = rng.random((gh, gw)).astype(np.float32)
    ys = np.linspace(0, gh - 1, h, dtype=np.float32)
    xs = np.linspace(0, gw - 1, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), gh - 2)
    x0 = np.minimum(xs.astype(int), gw - 2)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def background(rng: np.random.Generator, h: int, w: int, clutter: bool = True) -> np.ndarray:
    """A muted textured background (H, W, 3) float32: smooth colour fields, grain and (if
    ``clutter``) bars and lines."""
    base = np.stack([_smooth_noise(rng, h, w, int(rng.integers(3, 7))) for _ in range(3)], -1)
    palette = np.stack([_hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35),
                                    rng.uniform(0.3, 0.8)) for _ in range(3)])
    img = base @ palette / base.sum(-1, keepdims=True).clip(1e-3)
    fine = _smooth_noise(rng, h, w, int(rng.integers(20, 40)))
    img *= (0.8 + 0.4 * fine)[..., None]
    # clutter: muted bars and lines that are not objects
    for _ in range(int(rng.integers(4, 10)) if clutter else 0):
        col = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.9))
        if rng.random() < 0.5:
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            bh, bw = int(rng.integers(4, h // 3)), int(rng.integers(4, w // 3))
            img[y:y + bh, x:x + bw] = 0.5 * img[y:y + bh, x:x + bw] + 0.5 * col
        else:
            t = int(rng.integers(1, 4))
            if rng.random() < 0.5:
                y = int(rng.integers(0, h))
                img[y:y + t] = col
            else:
                x = int(rng.integers(0, w))
                img[:, x:x + t] = col
    return img.astype(np.float32)


def shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit shape at local coordinates (u, v) in [-1, 1]."""
    if kind == "disc":
        return u * u + v * v <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if kind == "triangle":  # apex up
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8 * 0.95)
    if kind == "star":
        r = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        return r <= 0.45 + 0.55 * ((np.cos(5 * theta) + 1) / 2) ** 1.5
    if kind == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    raise ValueError(kind)


def texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """A texture in [0, 1] at local coordinates; the pattern scales with the object."""
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(np.sqrt(u * u + v * v) * freq * 2.2)
    if kind == "checker":
        return (np.sin(u * freq) * np.sin(v * freq) > 0).astype(np.float32)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sign(np.sin((u + v) * freq))
    if kind == "glow":
        return np.clip(1.2 - np.sqrt(u * u + v * v), 0, 1)
    if kind == "dots":
        return ((np.cos(u * freq * 1.3) + np.cos(v * freq * 1.3)) > 1.0).astype(np.float32)
    if kind == "split":  # two halves plus a stripe: shows orientation under rotation
        return np.where(u > 0, 1.0, 0.0) * (0.6 + 0.4 * (np.abs(v) < 0.25))
    raise ValueError(kind)


#: Each detection class has its own shape, texture and hue (jittered per object).
_CLASS_LOOK = {"disc": ("rings", 0.0), "square": ("checker", 0.6), "triangle": ("stripes", 0.33),
               "star": ("glow", 0.15), "cross": ("dots", 0.83)}


@dataclass
class Sprite:
    shape: str
    texture: str
    color_a: np.ndarray
    color_b: np.ndarray
    freq: float

    def render(self, size: float, angle: float, cx: float, cy: float, h: int, w: int
               ) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray, int] | None:
        """Draw at centre (cx, cy) with half-size ``size``. Returns the clipped pixel window
        (y0, y1, x0, x1), the mask and colours inside it, and the shape's full pixel area
        (inside the frame or not); None when nothing falls inside the frame."""
        r = max(size, 1.0)
        fy0, fy1 = int(math.floor(cy - r)), int(math.ceil(cy + r)) + 1
        fx0, fx1 = int(math.floor(cx - r)), int(math.ceil(cx + r)) + 1
        ys = (np.arange(fy0, fy1, dtype=np.float32) + 0.5 - cy) / r
        xs = (np.arange(fx0, fx1, dtype=np.float32) + 0.5 - cx) / r
        v, u = np.meshgrid(ys, xs, indexing="ij")
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            u, v = c * u + s * v, -s * u + c * v
        mask = shape_mask(self.shape, u, v)
        area = int(mask.sum())
        y0, y1, x0, x1 = max(fy0, 0), min(fy1, h), max(fx0, 0), min(fx1, w)
        if area == 0 or y0 >= y1 or x0 >= x1:
            return None
        sl = (slice(y0 - fy0, y1 - fy0), slice(x0 - fx0, x1 - fx0))
        if not mask[sl].any():
            return None
        t = texture(self.texture, u[sl], v[sl], self.freq)[..., None]
        rgb = self.color_a * t + self.color_b * (1 - t)
        return (y0, y1, x0, x1), mask[sl], rgb, area


def detection_sprite(rng: np.random.Generator, cls: str) -> Sprite:
    tex, hue = _CLASS_LOOK[cls]
    hue = (hue + rng.uniform(-0.06, 0.06)) % 1.0
    a = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    b = _hsv_to_rgb((hue + rng.uniform(-0.05, 0.05)) % 1.0, rng.uniform(0.5, 1.0),
                    rng.uniform(0.2, 0.45))
    return Sprite(cls, tex, a, b, float(rng.uniform(7, 11)))


def _finish(img: np.ndarray, gain: float, noise_sigma: float, rng: np.random.Generator
            ) -> np.ndarray:
    out = img * gain
    if noise_sigma:
        out = out + rng.normal(0.0, noise_sigma, img.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


# --- detection videos -----------------------------------------------------------------------

@dataclass
class _Obj:
    cls: int
    sprite: Sprite
    x: float
    y: float
    size: float                     # half-size, pixels
    velocity: list[tuple[float, float]] = field(default_factory=list)  # per segment
    growth: list[float] = field(default_factory=list)                  # per segment, per frame


def _timeline(rng: np.random.Generator, frames: int) -> list[tuple[str, int, int]]:
    """Segments (kind, start, end): static stretches, object motion, camera pans, lighting."""
    out, t = [], 0
    kinds = ("static", "move", "pan", "light")
    probs = (0.4, 0.35, 0.12, 0.13)
    while t < frames:
        kind = str(rng.choice(kinds, p=probs)) if out else str(rng.choice(("static", "move")))
        n = int(rng.integers(12, 41))
        out.append((kind, t, min(frames, t + n)))
        t += n
    if not any(k == "move" for k, _, _ in out):  # every video has some object motion
        k, s, e = out[len(out) // 2]
        out[len(out) // 2] = ("move", s, e)
    return out


def render_detection_video(rng: np.random.Generator, cfg: DetectionConfig,
                           owner_maps: list[np.ndarray] | None = None
                           ) -> tuple[list[np.ndarray], list[list[dict]]]:
    """Frames (H, W, 3) uint8 and, per frame, the labelled objects in it. ``owner_maps``, if
    given, receives per frame the (H, W) id of the object seen at each pixel (-1: none)."""
    h, w = cfg.height, cfg.width
    margin_x, margin_y = w // 4, h // 4
    ch, cw = h + 2 * margin_y, w + 2 * margin_x
    bg = background(rng, ch, cw)
    segments = _timeline(rng, cfg.frames)

    objects: list[_Obj] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        cls = int(rng.integers(len(DETECTION_CLASSES)))
        size = float(rng.uniform(8, 26))
        if rng.random() < 0.3:  # starts outside the view, enters during the first motion
            side = int(rng.integers(4))
            x = [margin_x - size, margin_x + w + size, rng.uniform(margin_x, margin_x + w),
                 rng.uniform(margin_x, margin_x + w)][side]
            y = [rng.uniform(margin_y, margin_y + h), rng.uniform(margin_y, margin_y + h),
                 margin_y - size, margin_y + h + size][side]
        else:
            x = float(rng.uniform(margin_x + size, margin_x + w - size))
            y = float(rng.uniform(margin_y + size, margin_y + h - size))
        obj = _Obj(cls, detection_sprite(rng, DETECTION_CLASSES[cls]), float(x), float(y), size)
        for kind, s, e in segments:
            if kind == "move" and rng.random() < 0.8:
                # head roughly towards the view centre half the time (objects enter), anywhere
                # otherwise (objects leave)
                if rng.random() < 0.5:
                    ang = math.atan2(margin_y + h / 2 - y, margin_x + w / 2 - x)
                    ang += rng.uniform(-0.6, 0.6)
                else:
                    ang = rng.uniform(0, 2 * math.pi)
                speed = rng.uniform(0.6, 2.5)
                obj.velocity.append((speed * math.cos(ang), speed * math.sin(ang)))
                obj.growth.append(float(np.exp(rng.uniform(-0.4, 0.4) / max(e - s, 1))))
            else:
                obj.velocity.append((0.0, 0.0))
                obj.growth.append(1.0)
        objects.append(obj)

    # a foreground pillar in some videos: objects pass behind it
    pillar = None
    if rng.random() < 0.5:
        pw = int(rng.integers(8, 20))
        px = int(rng.integers(margin_x, margin_x + w - pw))
        pcol = _hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.6))
        pillar = (px, pw, pcol)

    cam = np.array([float(margin_x), float(margin_y)])
    cam_v = np.zeros(2)
    gain, gain_step = 1.0, 0.0
    noise_sigma = float(rng.uniform(1.0, 4.0))
    frames, labels = [], []
    seg_of = np.zeros(cfg.frames, dtype=int)
    for i, (_, s, e) in enumerate(segments):
        seg_of[s:e] = i
    for t in range(cfg.frames):
        si = seg_of[t]
        kind, s, e = segments[si]
        if t == s:  # a segment starts: set the camera and lighting for it
            cam_v[:] = 0.0
            gain_step = 0.0
            if kind == "pan":
                ang = rng.uniform(0, 2 * math.pi)
                cam_v[:] = rng.uniform(0.7, 2.0) * np.array([math.cos(ang), math.sin(ang)])
            elif kind == "light":
                gain_step = (rng.uniform(0.6, 1.35) - gain) / (e - s)
        if t > 0:
            cam = np.clip(cam + cam_v, 0, [2 * margin_x, 2 * margin_y])
            gain += gain_step
            for o in objects:
                vx, vy = o.velocity[si]
                o.x += vx
                o.y += vy
                o.size = float(np.clip(o.size * o.growth[si], 6.0, 32.0))
        ox, oy = int(round(cam[0])), int(round(cam[1]))
        img = bg[oy:oy + h, ox:ox + w].copy()
        owner = np.full((h, w), -1, dtype=np.int16)
        drawn = {}
        for k, o in enumerate(objects):
            r = o.sprite.render(o.size, 0.0, o.x - ox, o.y - oy, h, w)
            if r is None:
                continue
            (y0, y1, x0, x1), mask, rgb, area = r
            region = img[y0:y1, x0:x1]
            region[mask] = rgb[mask]
            owner[y0:y1, x0:x1][mask] = k
            ys, xs = np.nonzero(mask)
            drawn[k] = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1, area)
        if pillar is not None:
            px, pw, pcol = pillar
            a, b = max(px - ox, 0), min(px - ox + pw, w)
            if a < b:
                img[:, a:b] = pcol
                owner[:, a:b] = -1
        visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(objects))
        frame_labels = []
        for k, (x0, y0, x1, y1, area) in drawn.items():
            vis = float(visible[k]) / area
            if visible[k] == 0:
                continue
            difficult = vis < MIN_VISIBLE or min(x1 - x0, y1 - y0) < MIN_BOX_PX
            frame_labels.append({"object_id": k, "class_id": objects[k].cls,
                                 "box": (float(x0), float(y0), float(x1), float(y1)),
                                 "visible": vis, "difficult": bool(difficult)})
        frames.append(_finish(img, gain, noise_sigma, rng))
        labels.append(frame_labels)
        if owner_maps is not None:
            owner_maps.append(owner)
    return frames, labels


# --- recognition clips ----------------------------------------------------------------------

def _actor_sprite(rng: np.random.Generator) -> Sprite:
    shape = str(rng.choice(DETECTION_CLASSES))
    # a texture that shows orientation, so rotation is visible whatever the shape
    tex = str(rng.choice(("split", "stripes", "checker")))
    if shape == "disc" and tex == "checker":
        tex = "split"
    hue = rng.random()
    a = _hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0))
    b = _hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1.0, rng.uniform(0.4, 1.0),
                    rng.uniform(0.2, 0.6))
    return Sprite(shape, tex, a, b, float(rng.uniform(5, 8)))


def _motion(rng: np.random.Generator, cls: str, n: int, size_px: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre x, y, half-size and angle of the actor for motion class ``cls``."""
    t = np.arange(n, dtype=np.float64)
    s0 = rng.uniform(12, 18)
    size = np.full(n, s0)
    angle = rng.uniform(0, 2 * math.pi) + rng.uniform(-0.03, 0.03) * t
    lo, hi = 0.2 * size_px, 0.8 * size_px
    x0, y0 = rng.uniform(lo, hi), rng.uniform(lo, hi)
    drift = rng.uniform(-0.25, 0.25, size=2)
    x, y = x0 + drift[0] * t, y0 + drift[1] * t
    if cls.startswith("move_"):
        speed = rng.uniform(3.0, 4.5)
        span = speed * (n - 1)
        start = rng.uniform(0.15 * size_px, 0.85 * size_px - span)
        path = start + speed * t
        if cls == "move_right":
            x = path
        elif cls == "move_left":
            x = size_px - path
        elif cls == "move_down":
            y = path
        else:
            y = size_px - path
    elif cls.startswith("rotate_"):
        omega = math.radians(rng.uniform(10, 18)) * (1 if cls == "rotate_cw" else -1)
        angle = angle[0] + omega * t
    elif cls in ("approach", "recede"):
        grow = rng.uniform(1.7, 2.4)
        small = rng.uniform(8, 12)
        ramp = small * grow ** (t / (n - 1))
        size = ramp if cls == "approach" else ramp[::-1].copy()
    elif cls == "bounce":
        floor = rng.uniform(0.7, 0.88) * size_px
        g = rng.uniform(1.0, 1.6)
        yy = floor - rng.uniform(0.25, 0.45) * size_px
        vy = rng.uniform(-1.0, 1.5)
        ys = []
        for _ in range(n):
            ys.append(yy)
            vy += g
            yy += vy
            if yy > floor:
                yy = 2 * floor - yy
                vy = -0.9 * vy
        y = np.array(ys)
    else:  # pragma: no cover - the class list is closed
        raise ValueError(cls)
    return x, y, size, angle


def render_recognition_clip(rng: np.random.Generator, cfg: RecognitionConfig, cls: str
                            ) -> list[np.ndarray]:
    n, s = cfg.frames, cfg.size
    bg = background(rng, s, s, clutter=False)
    distractors = []  # static objects: a single frame cannot tell which one is the actor
    for _ in range(int(rng.integers(0, 2))):
        sp = _actor_sprite(rng)
        distractors.append((sp, rng.uniform(6, 10), rng.uniform(0, 2 * math.pi),
                            rng.uniform(0, s), rng.uniform(0, s)))
    actor = _actor_sprite(rng)
    xs, ys, sizes, angles = _motion(rng, cls, n, s)
    gain0, gain1 = rng.uniform(0.8, 1.15, size=2)
    noise_sigma = float(rng.uniform(1.0, 3.0))
    frames = []
    for t in range(n):
        img = bg.copy()
        # the actor is drawn last: it may cross in front of the distractors
        for sp, sz, ang, x, y in [*distractors, (actor, sizes[t], angles[t], xs[t], ys[t])]:
            r = sp.render(float(sz), float(ang), float(x), float(y), s, s)
            if r is None:
                continue
            (y0, y1, x0, x1), mask, rgb, _ = r
            img[y0:y1, x0:x1][mask] = rgb[mask]
        gain = gain0 + (gain1 - gain0) * t / max(n - 1, 1)
        frames.append(_finish(img, gain, noise_sigma, rng))
    return frames


# --- writing --------------------------------------------------------------------------------

def write_mp4(path: str | os.PathLike, frames: list[np.ndarray], fps: float, crf: int = 20
              ) -> None:
    """H.264 MP4, yuv420p, one encoder thread (deterministic, and kind to shared cores)."""
    import av

    h, w = frames[0].shape[:2]
    tmp = Path(str(path) + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        stream.codec_context.thread_count = 1
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _seed_str(seed: int, task: str, split: str, index: int) -> str:
    return f"{seed}/{_TASK_ID[task]}/{_SPLIT_ID[split]}/{index}"


def generate_split(out: Path, task: str, split: str, count: int, seed: int,
                   det: DetectionConfig = DetectionConfig(),
                   rec: RecognitionConfig = RecognitionConfig(),
                   progress: Callable[[int, int], None] | None = None) -> None:
    """Generate ``count`` videos of one split under ``out/<task>/<split>``."""
    split_dir = out / task / split
    (split_dir / "videos").mkdir(parents=True, exist_ok=True)
    videos, labels = [], []
    for i in range(count):
        rng = video_rng(seed, task, split, i)
        name = f"{split}_{i:05d}"
        rel = f"videos/{name}.mp4"
        if task == "detection":
            frames, per_frame = render_detection_video(rng, det)
            for t, objs in enumerate(per_frame):
                for o in objs:
                    x0, y0, x1, y1 = o["box"]
                    labels.append({"video": rel, "frame": t, "object_id": o["object_id"],
                                   "class_id": o["class_id"],
                                   "class_name": DETECTION_CLASSES[o["class_id"]],
                                   "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                                   "visible": o["visible"], "difficult": o["difficult"]})
            fps = det.fps
        else:
            # classes in turn so every split is balanced
            cls_id = i % len(RECOGNITION_CLASSES)
            frames = render_recognition_clip(rng, rec, RECOGNITION_CLASSES[cls_id])
            labels.append({"video": rel, "class_id": cls_id,
                           "class_name": RECOGNITION_CLASSES[cls_id]})
            fps = rec.fps
        write_mp4(split_dir / rel, frames, fps)
        h, w = frames[0].shape[:2]
        videos.append({"video": rel, "frames": len(frames), "width": w, "height": h,
                       "fps": fps, "seed": _seed_str(seed, task, split, i)})
        if progress is not None:
            progress(i + 1, count)
    schema = DETECTION_LABEL_SCHEMA if task == "detection" else RECOGNITION_LABEL_SCHEMA
    _write_table(pa.Table.from_pylist(labels, schema=schema), split_dir / "labels.parquet")
    _write_table(pa.Table.from_pylist(videos, schema=VIDEO_SCHEMA), split_dir / "videos.parquet")


def _write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def generate(out: str | os.PathLike, task: str, seed: int = 0, sizes: SplitSizes | None = None,
             det: DetectionConfig = DetectionConfig(),
             rec: RecognitionConfig = RecognitionConfig(),
             progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Generate every split of ``task`` under ``out/<task>``; returns that folder. The
    parameters are recorded in ``dataset.json`` (written last: its presence means complete)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    sizes = sizes or DEFAULT_SIZES[task]
    root = Path(out) / task
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").unlink(missing_ok=True)
    start = time.time()
    for split, count in sizes.items():
        generate_split(Path(out), task, split, count, seed, det, rec,
                       progress=(lambda i, n, s=split: progress(s, i, n)) if progress else None)
    meta = {"task": task, "seed": seed, "generator_version": GENERATOR_VERSION[task],
            "splits": dict(sizes.items()),
            "classes": list(DETECTION_CLASSES if task == "detection" else RECOGNITION_CLASSES),
            "config": asdict(det if task == "detection" else rec),
            "generation_s": round(time.time() - start, 1)}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root

