"""Helpers for method tests: real frames, a method stepped over streams, meta-device counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from models import StreamRunner, build_model
from models.flops import build_meta
from models.ledger import Ledger
from models.methods import Method, StepContext

VIDEOS = ("mma_test.mp4", "decord_flipping_a_pancake.mkv", "mma_test.avi")
FRAMES = 5


@pytest.fixture(scope="module")
def clips(sample_videos) -> dict[str, list]:
    """The first frames of three real clips of different sizes."""
    return {name: read_frames(sample_videos / name, FRAMES) for name in VIDEOS}


def vitdet(input_size: int = 224, **options):
    """ViTDet layout: windowed blocks 0 and 2 (7x7 windows, padded at other sizes), global
    blocks 1 and 3, decomposed relative position everywhere, its tables random (they start at
    zero, which would leave the methods' relative-position updates untested)."""
    torch.manual_seed(0)
    options = {"depth": 4, "window": 7, "global_blocks": (1, 3), **options}
    return random_rel_pos(build_model(arch="vitdet-ti", input_size=input_size, **options))


def random_rel_pos(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """``model`` with random relative-position tables (from the global seed) in every block
    that has them: they start at zero, which leaves a method's relative-position terms
    untested."""
    with torch.no_grad():
        for blk in model.backbone.blocks:
            if blk.attn.use_rel_pos:
                blk.attn.rel_pos_h.normal_(std=std)
                blk.attn.rel_pos_w.normal_(std=std)
    return model


def vivit():
    """ViViT spatial model: every block global, a class token, no relative position."""
    torch.manual_seed(0)
    return build_model(arch="vivit-ti", input_size=112, depth=3, temporal_depth=1,
                       clip_frames=4)


def all_tokens(policy: str, tokens: int) -> dict:
    """Parameters under which ``policy`` passes every one of ``tokens`` tokens."""
    return {"top_r": {"policy": "top_r", "r": tokens},
            "threshold": {"policy": "threshold", "threshold": 0.0},
            "top_fraction": {"policy": "top_fraction", "fraction": 1.0}}[policy]


def read_frames(path: Path, count: int, start: int = 0) -> list[np.ndarray]:
    """``count`` consecutive decoded RGB frames of a video."""
    import decord

    reader = decord.VideoReader(str(path))
    return list(reader.get_batch(list(range(start, start + count))).asnumpy())


@dataclass
class Step:
    tokens: torch.Tensor  # (B, P+N, D) final backbone tokens
    ledger: Ledger


def run_backbone(model: torch.nn.Module, method: Method, streams: list[list[np.ndarray]],
                 state=None, first_step: int = 0) -> tuple[list[Step], object]:
    """Step ``method`` over streams side by side (frame t of every stream per step), the way
    the runner does, and keep the final backbone tokens and the ledger of every step.
    ``state``/``first_step``: carry on with a state that already ran ``first_step`` frames."""
    runner = StreamRunner(model, method)
    if state is None:
        state = method.new_state(model.backbone, len(streams))
    steps = []
    for t in range(len(streams[0])):
        if model.task == "detection":
            images = torch.stack([runner.preprocess_detection(s[t])[0] for s in streams])
        else:
            images = torch.stack([runner.preprocess_recognition(s[t]) for s in streams])
        ledger = Ledger(len(streams))
        with torch.inference_mode():
            emb = model.backbone.embed(images, ledger)
            ctx = StepContext(valid=None, first=first_step + t == 0,
                              input_size=tuple(images.shape[-2:]))
            tokens = method.forward(model.backbone, emb, state, ledger, ctx)
        steps.append(Step(tokens, ledger))
    return steps, state


def meta_gmacs(arch: str, input_size: int, method: Method, frames: int = 2,
               **options) -> list[dict[str, float]]:
    """Per-frame GMACs by ledger category of ``method`` on a blank stream of ``frames``
    frames, counted on the meta device (shapes only; a top-r policy's counts do not depend
    on frame content)."""
    model, _ = build_meta(arch, input_size, options=options)
    state = method.new_state(model.backbone, 1)
    out = []
    for t in range(frames):
        ledger = Ledger(1)
        emb = model.backbone.embed(torch.zeros(1, 3, input_size, input_size, device="meta"),
                                   ledger)
        ctx = StepContext(valid=None, first=t == 0, input_size=(input_size, input_size))
        method.forward(model.backbone, emb, state, ledger, ctx)
        out.append({k: float(v[0]) / 1e9 for k, v in ledger.macs.items()})
    return out
