"""Training: CenterNet targets and losses, a short run that learns, resume, saving an entry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import build_arch
from models.registry import build_zoo_model, zoo_entries
from models.training import (TrainConfig, centernet_targets, detection_loss, detector_raw,
                             fit, gaussian_radius, recognition_loss, save_zoo_entry)

CLASSES = ["a", "b", "c"]


def tiny_detector():
    torch.manual_seed(0)
    return build_arch("vitdet-ti", class_names=CLASSES, input_size=64, window=2, depth=4,
                      dim=32, heads=2, neck_channels=16, neck_scales=(2.0,),
                      pretrain_grid=(4, 4))


def test_centernet_targets_in_head_units():
    boxes = [torch.tensor([[8.0, 16.0, 24.0, 48.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    t = centernet_targets(boxes, labels, 3, (8, 8), stride=8)
    # centre (16, 32) px -> cell (2, 4) exactly; size in cells; peak 1 only there
    assert t.heatmap[0, 2, 4, 2] == 1.0
    assert t.heatmap.eq(1).sum() == 1 and t.heatmap[1].sum() == 0
    assert t.index[0, 0] == 4 * 8 + 2
    assert t.size[0, 0].tolist() == [2.0, 4.0]
    assert t.offset[0, 0].tolist() == [0.0, 0.0]
    assert t.mask.tolist() == [[1.0], [0.0]]
    assert gaussian_radius(10, 10) > 0


def test_decode_reads_targets_back():
    """A head whose raw maps equal the targets decodes to the original boxes: the loss's
    units are the ones ``CenterNetHead.decode`` reads."""
    model = tiny_detector()
    box = torch.tensor([[10.0, 12.0, 30.0, 40.0]])
    t = centernet_targets([box], [torch.tensor([1])], 3, (8, 8), stride=8)
    raw = {"heatmap": torch.logit(t.heatmap.clamp(1e-6, 1 - 1e-6)),
           "size": torch.zeros(1, 2, 8, 8), "offset": torch.zeros(1, 2, 8, 8)}
    iy, ix = divmod(int(t.index[0, 0]), 8)
    raw["size"][0, :, iy, ix] = t.size[0, 0]
    raw["offset"][0, :, iy, ix] = t.offset[0, 0]
    dets = model.head.decode(raw, score_threshold=0.5)[0]
    assert dets.labels.tolist() == [1]
    assert dets.boxes[0].tolist() == pytest.approx(box[0].tolist(), abs=1e-4)


def _frames_and_boxes(n=8):
    """Real generated frames (class 0 discs etc.) at 64 x 48, with their boxes."""
    from pipeline.synthetic import DetectionConfig, render_detection_video, video_rng

    frames, labels = render_detection_video(video_rng(0, "detection", "train", 1),
                                            DetectionConfig(width=64, height=48, frames=n))
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    images = torch.zeros(n, 3, 64, 64)
    for i, f in enumerate(frames):
        images[i, :, :48] = (torch.from_numpy(f).permute(2, 0, 1).float() - mean) / std
    boxes = [torch.tensor([o["box"] for o in f], dtype=torch.float32).reshape(-1, 4)
             for f in labels]
    cls = [torch.tensor([o["class_id"] % 3 for o in f], dtype=torch.long) for f in labels]
    return images, boxes, cls


def test_short_detection_run_lowers_the_loss(tmp_path):
    model = tiny_detector()
    batch = _frames_and_boxes(4)
    losses = []
    fit(model, lambda m, b: detection_loss(m, *b), lambda step: batch,
        TrainConfig(steps=20, lr=3e-3, warmup_steps=4, log_every=4), tmp_path,
        on_log=lambda step, rec: losses.append(rec["loss"]))
    assert losses[-1] < 0.6 * losses[0]
    log = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(4, 21, 4))
    assert {"loss", "heatmap", "size", "offset", "lr", "train_s"} <= set(log[0])


def test_recognition_loss_learns_a_batch():
    torch.manual_seed(0)
    model = build_arch("videomae-ti", class_names=CLASSES, input_size=32, clip_frames=4,
                       depth=2, dim=32, heads=2)
    clips = torch.randn(3, 3, 4, 32, 32)
    labels = torch.tensor([0, 1, 2])
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    first = None
    for _ in range(20):
        out = recognition_loss(model, clips, labels)
        first = first if first is not None else float(out["loss"].detach())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["loss"].detach()) < 0.5 * first and float(out["accuracy"]) == 1.0


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    """An interrupted run resumed from its checkpoint ends with the weights, and the loss log,
    of a run that was never interrupted."""
    batches = [_frames_and_boxes(2)] * 6

    def run(run_dir, stop_at=None):
        model = tiny_detector()

        def next_batch(step):
            if step == stop_at:
                raise Interrupt
            return batches[step]

        cfg = TrainConfig(steps=6, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every_s=0)
        try:
            fit(model, lambda m, b: detection_loss(m, *b), next_batch, cfg, run_dir)
        except Interrupt:
            return None
        return model

    straight = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_at=3) is None
    assert json.loads((tmp_path / "b" / "loss.jsonl").read_text().splitlines()[-1])["step"] == 3
    resumed = run(tmp_path / "b")
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    log = (tmp_path / "b" / "loss.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_saved_entry_loads_as_a_zoo_model(tmp_path):
    model = tiny_detector().eval()
    save_zoo_entry(model, tmp_path / "tiny-det", {"task": "detection", "model_card": {}})
    entry = zoo_entries(tmp_path)["tiny-det"]
    assert entry.arch == "vitdet-ti" and entry.class_names == CLASSES
    loaded = build_zoo_model("tiny-det", tmp_path)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = detector_raw(model, images)["heatmap"]
        b = detector_raw(loaded, images)["heatmap"]
    # float16 storage: close, not equal
    assert torch.allclose(a, b, atol=0.05)
    assert (tmp_path / "tiny-det.safetensors").stat().st_size < 0.6 * 4 * sum(
        p.numel() for p in model.parameters())


def test_inflation_from_an_image_backbone():
    """A still clip embeds as its frame does in the image model, and the blocks are copied."""
    image = tiny_detector()
    video = build_arch("videomae-ti", class_names=CLASSES, input_size=32, clip_frames=4,
                       depth=2, dim=32, heads=2)
    from models.training import inflate_image_backbone

    copied = inflate_image_backbone(video, image.state_dict())
    assert "backbone.blocks.1.mlp.fc2.weight" in copied
    assert not any("rel_pos" in k for k in copied)
    frame = torch.randn(1, 3, 32, 32)
    clip = frame[:, :, None].expand(1, 3, 4, 32, 32)
    with torch.no_grad():
        a, _ = image.backbone.patch_embed(frame)
        b, _ = video.backbone.patch_embed(clip)
    assert torch.allclose(a, b.view(1, 2, 4, 32)[:, 0], atol=1e-5)
    assert torch.equal(video.backbone.blocks[1].attn.qkv.weight,
                       image.backbone.blocks[1].attn.qkv.weight)
