"""The two-stage ViTDet head end to end on random weights (tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.ledger import Ledger
from models.rcnn import RCNNHead

NECK, CLASSES = 16, 3
OPTS = dict(depth=2, dim=32, heads=2, input_size=128, window=4, global_blocks=(1,),
            pretrain_grid=(4, 4), neck_channels=NECK, num_classes=CLASSES,
            rcnn={"box_conv_dims": [NECK] * 4, "box_fc_dims": [32], "pre_nms_topk": 60,
                  "post_nms_topk": 20})


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_model(arch="vitdet-b-rcnn", **OPTS)


def detect(model, images, sizes, ledger=None, threshold=0.05):
    bb = model.backbone
    with torch.no_grad():
        e = bb.embed(images, ledger)
        tokens, _ = bb.forward_blocks(e.tokens, e.grid, ledger)
        return model.forward_head(tokens, e.grid, ledger, images, threshold, image_sizes=sizes)


def test_detections_are_valid_boxes(detector):
    images = torch.randn(2, 3, 128, 128)
    sizes = [(128, 96), (100, 128)]  # the images before square padding
    dets = detect(detector, images, sizes)
    assert len(dets) == 2 and all(len(d) > 0 for d in dets)
    for d, (h, w) in zip(dets, sizes):
        b = d.boxes
        assert torch.isfinite(b).all()
        assert (b[:, 0] <= b[:, 2]).all() and (b[:, 1] <= b[:, 3]).all()
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all()   # clipped to the real image
        assert (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
        assert ((d.scores > 0.05) & (d.scores <= 1)).all()
        assert torch.all(d.scores[:-1] >= d.scores[1:])
        assert d.labels.dtype == torch.long and ((d.labels >= 0) & (d.labels < CLASSES)).all()
        assert len(d) <= detector.head.settings.max_detections


def test_a_batch_gives_what_each_image_gives_alone(detector):
    images = torch.randn(3, 3, 128, 128)
    sizes = [(128, 128), (128, 80), (64, 128)]
    together = detect(detector, images, sizes)
    for i in range(3):
        alone = detect(detector, images[i:i + 1], sizes[i:i + 1])[0]
        torch.testing.assert_close(together[i].boxes, alone.boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(together[i].scores, alone.scores, rtol=1e-4, atol=1e-5)
        assert torch.equal(together[i].labels, alone.labels)


def per_roi_macs() -> int:
    conv = 7 * 7 * NECK * (NECK * 9)          # 3x3 conv on a 7x7 RoI, LayerNorm, no bias
    fc = NECK * 49 * 32 + 32
    predictor = (32 * (CLASSES + 1) + CLASSES + 1) + (32 * 4 * CLASSES + 4 * CLASSES)
    return 4 * conv + fc + predictor


def test_head_work_is_counted_per_stream(detector):
    images = torch.randn(2, 3, 128, 128)
    sizes = [(128, 128), (128, 128)]
    led = Ledger(2)
    detect(detector, images, sizes, led)
    # the same neck and RPN for both streams, then the box head on each stream's proposals
    with torch.no_grad():
        bb = detector.backbone
        e = bb.embed(images)
        tokens, _ = bb.forward_blocks(e.tokens, e.grid)
        fmap = tokens.transpose(1, 2).reshape(2, -1, *e.grid)
        features = RCNNHead.with_p6(detector.neck(fmap))
        proposals = detector.head.proposal_generator(features, sizes)
        fixed = Ledger(2)
        detector.head.forward_raw(detector.neck(fmap, fixed), fixed, proposals_per_image=0)
    expected = fixed.macs["head"] + torch.tensor([len(p) * per_roi_macs() for p in proposals],
                                                 dtype=torch.float64)
    assert led.macs["head"].tolist() == expected.tolist()
    # counting on the meta device with the standard proposal count gives the same per-RoI cost
    raw = Ledger(1)
    with torch.device("meta"):
        meta = build_model(arch="vitdet-b-rcnn", **OPTS)
        feats = meta.neck(torch.zeros(1, 32, 8, 8), raw)
        meta.head.forward_raw(feats, raw)
    assert float(raw.macs["head"][0]) == float(fixed.macs["head"][0]) + 20 * per_roi_macs()


def test_runs_in_bfloat16(detector):
    model = build_model(arch="vitdet-b-rcnn", **OPTS)
    model.load_state_dict(detector.state_dict())
    model = model.to(torch.bfloat16)
    dets = detect(model, torch.randn(1, 3, 128, 128, dtype=torch.bfloat16), [(128, 128)])
    assert dets[0].boxes.dtype == torch.float32 and len(dets[0]) > 0
    assert torch.isfinite(dets[0].boxes).all()


def test_unknown_rcnn_option_is_refused():
    from models import ModelError

    with pytest.raises(ModelError, match="unknown rcnn options: post_nms"):
        build_model(arch="vitdet-b-rcnn", **{**OPTS, "rcnn": {"post_nms": 10}})


def test_runner_clips_proposals_to_the_frame_not_the_padding(detector):
    """Through the runner, a 64x128 frame is detected as detectron2 would: boxes clipped to
    the 64 real rows (not the 128 of the square padding), then mapped back to frame pixels."""
    from models import StreamRunner, build_method

    frame = torch.randint(0, 256, (32, 64, 3), dtype=torch.uint8).numpy()  # scaled x2 to 64x128
    runner = StreamRunner(detector, build_method("none"), score_threshold=0.05)
    got = runner.step([frame], runner.new_state(1))[0].detections
    image, scale, size = runner.preprocess_detection(frame)
    assert scale == 2.0 and size == (64, 128)
    want = detect(detector, image[None], [size])[0]
    assert len(got) == len(want) > 0
    torch.testing.assert_close(got.boxes, want.boxes / 2)
    assert (got.boxes[:, 3] <= 32).all()


def test_an_image_without_proposals_gives_no_detections(detector):
    """Every proposal of a zero-size image is empty after clipping: no RoIs, no boxes."""
    dets = detect(detector, torch.randn(2, 3, 128, 128), [(128, 128), (0, 0)])
    assert len(dets[0]) > 0 and len(dets[1]) == 0
    assert dets[1].boxes.shape == (0, 4)
