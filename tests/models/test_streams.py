"""Several streams as one batch give what each stream gives alone; bf16 on CPU stays close to
fp32; the CenterNet decoder reads a hand-made heatmap right; ViViT tubelets through the runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import StreamRunner, build_method, build_model
from models.heads import CenterNetHead, Detections
from models.runner import IMAGENET_MEAN, IMAGENET_STD, frame_detections

VITDET = dict(depth=2, dim=32, heads=2, input_size=96, window=4, global_blocks=(1,),
              pretrain_grid=(4, 4), neck_channels=16, num_classes=3)


def frames_of(seed: int, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="module")
def vitdet():
    torch.manual_seed(0)
    return build_model(arch="vitdet-b", **VITDET)


def test_backbone_batch_equals_each_stream_alone(vitdet):
    x = torch.randn(3, 3, 96, 96)  # a 6x6 grid: windows of 4 need padding
    bb = vitdet.backbone
    with torch.no_grad():
        e = bb.embed(x)
        together, _ = bb.forward_blocks(e.tokens, e.grid)
        for i in range(3):
            ei = bb.embed(x[i:i + 1])
            alone, _ = bb.forward_blocks(ei.tokens, ei.grid)
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_runner_batch_equals_each_stream_alone(vitdet):
    sizes = [(60, 80), (80, 60), (64, 64)]
    videos = [frames_of(step, sizes) for step in range(3)]   # videos[step][stream]
    runner = StreamRunner(vitdet, build_method("none"), score_threshold=0.05)
    state = runner.new_state(3)
    batch = [runner.step(frames, state) for frames in videos[:2]]
    state = runner.select(state, [2, 0])                    # stream 1 ends early
    batch.append(runner.step([videos[2][2], videos[2][0]], state))
    for stream in range(3):
        alone_state = runner.new_state(1)
        steps = 3 if stream != 1 else 2
        for step in range(steps):
            alone = runner.step([videos[step][stream]], alone_state)[0]
            if step < 2:
                got = batch[step][stream]
            else:
                got = batch[2][[2, 0].index(stream)]
            assert len(got.detections) == len(alone.detections) > 0
            torch.testing.assert_close(got.detections.boxes, alone.detections.boxes,
                                       rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(got.detections.scores, alone.detections.scores,
                                       rtol=1e-4, atol=1e-5)
            assert got.gmacs_run == pytest.approx(alone.gmacs_run)
            assert got.gmacs_head == pytest.approx(alone.gmacs_head)
            assert got.gmacs_run == pytest.approx(got.gmacs_dense)  # dense method


def test_frames_of_several_sizes_are_preprocessed_as_each_alone(vitdet):
    """Frames are resized per size group in one go; each image must come out as it does
    alone, and alone as the definition says (longest side to the input size, normalised,
    zero padding at the bottom and right; shorter side resized and centre-cropped)."""
    runner = StreamRunner(vitdet, build_method("none"))
    frames = frames_of(7, [(60, 80), (96, 96), (60, 80), (120, 40)])
    images, scales, sizes = runner.preprocess_detections(frames)
    assert sizes == [(72, 96), (96, 96), (72, 96), (96, 32)]
    assert scales == [96 / 80, 1.0, 96 / 80, 96 / 120]
    for i, frame in enumerate(frames):
        alone, scale, size = runner.preprocess_detection(frame)
        assert (scale, size) == (scales[i], sizes[i])
        torch.testing.assert_close(images[i], alone, rtol=0, atol=0)
    img = torch.as_tensor(frames[3]).permute(2, 0, 1).float()[None]
    img = torch.nn.functional.interpolate(img, size=(96, 32), mode="bilinear",
                                          align_corners=False, antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(images[3, :, :, :32], (img - mean) / std)
    assert not images[3, :, :, 32:].any()

    rec = runner.preprocess_recognitions(frames)
    assert rec.shape == (4, 3, 96, 96)
    for i, frame in enumerate(frames):
        torch.testing.assert_close(rec[i], runner.preprocess_recognition(frame), rtol=0, atol=0)
    img = torch.as_tensor(frames[0]).permute(2, 0, 1).float()[None]
    img = torch.nn.functional.interpolate(img, size=(96, 128), mode="bilinear",
                                          align_corners=False, antialias=False)[0]
    torch.testing.assert_close(rec[0], (img[:, :, 16:112] - mean) / std)


def test_clip_model_batch_equals_each_stream_alone():
    torch.manual_seed(1)
    model = build_model(arch="videomae-ti", depth=1, dim=32, heads=2, input_size=32,
                        clip_frames=4, num_classes=5)
    runner = StreamRunner(model, build_method("none"))
    video = [frames_of(step, [(40, 50), (50, 40)]) for step in range(5)]
    state = runner.new_state(2)
    clips = [[], []]
    for frames in video:
        for i, out in enumerate(runner.step(frames, state)):
            clips[i] += out.clips
    for stream in range(2):
        alone_state = runner.new_state(1)
        alone = [c for frames in video for c in runner.step([frames[stream]], alone_state)[0].clips]
        assert len(alone) == len(clips[stream]) == 1
        torch.testing.assert_close(clips[stream][0].probs, alone[0].probs, rtol=1e-5, atol=1e-6)


def test_centernet_decodes_a_hand_made_heatmap():
    head = CenterNetHead(4, num_classes=2, level="p3", max_detections=10)  # stride 8
    heat = torch.full((1, 2, 6, 6), -10.0)
    heat[0, 1, 2, 3] = 2.0    # a peak of class 1 at row 2, column 3
    heat[0, 1, 2, 4] = 1.0    # its weaker neighbour: suppressed, not a local maximum
    heat[0, 0, 4, 1] = 0.0    # a peak of class 0, score 0.5
    size = torch.zeros(1, 2, 6, 6)
    offset = torch.zeros(1, 2, 6, 6)
    size[0, :, 2, 3] = torch.tensor([3.0, 2.0])      # width, height in stride units
    offset[0, :, 2, 3] = torch.tensor([0.5, 0.25])   # x, y
    size[0, :, 4, 1] = torch.tensor([1.0, 1.0])
    dets = head.decode({"heatmap": heat, "size": size, "offset": offset}, score_threshold=0.3)[0]
    assert dets.labels.tolist() == [1, 0]
    torch.testing.assert_close(dets.scores, torch.sigmoid(torch.tensor([2.0, 0.0])))
    # centre ((3 + 0.5) * 8, (2 + 0.25) * 8) = (28, 18), size (24, 16)
    torch.testing.assert_close(dets.boxes, torch.tensor([[16.0, 10.0, 40.0, 26.0],
                                                         [4.0, 28.0, 12.0, 36.0]]))
    assert len(head.decode({"heatmap": heat, "size": size, "offset": offset}, 0.6)[0]) == 1


def test_centernet_drops_peaks_whose_box_has_no_area():
    """A size regressed to zero or below is no box: it used to come out as a zero-width box
    that matched nothing, not even itself (dense agreement 99.92 % with itself)."""
    head = CenterNetHead(4, num_classes=1, level="p3", max_detections=10)
    heat = torch.full((1, 1, 8, 8), -10.0)
    size = torch.ones(1, 2, 8, 8)
    for col, (w, h) in enumerate([(2.0, 2.0), (0.0, 2.0), (-0.5, 1.0), (1.0, 0.0)]):
        heat[0, 0, 1, 2 * col] = 1.0
        size[0, :, 1, 2 * col] = torch.tensor([w, h])
    dets = head.decode({"heatmap": heat, "size": size, "offset": torch.zeros(1, 2, 8, 8)},
                       score_threshold=0.3)[0]
    assert len(dets) == 1
    torch.testing.assert_close(dets.boxes, torch.tensor([[-8.0, 0.0, 8.0, 16.0]]))


def test_boxes_are_clipped_to_the_frame_and_dropped_when_nothing_is_left():
    dets = Detections(torch.tensor([[10.0, 10.0, 30.0, 20.0],    # inside
                                    [-10.0, 50.0, 20.0, 90.0],   # partly outside: clipped
                                    [130.0, 10.0, 150.0, 30.0],  # right of the frame
                                    [5.0, 5.0, 9.0, 9.0]]),      # inside, under threshold
                      torch.tensor([0.9, 0.8, 0.7, 0.2]), torch.tensor([0, 1, 2, 0]))
    got, = frame_detections([dets], [2.0], [(40, 60)], score_threshold=0.3)
    torch.testing.assert_close(got.boxes, torch.tensor([[5.0, 5.0, 15.0, 10.0],
                                                        [0.0, 25.0, 10.0, 40.0]]))
    torch.testing.assert_close(got.scores, torch.tensor([0.9, 0.8]))
    assert got.labels.tolist() == [0, 1]
    # streams converted together: each with its own scale and frame, exactly as alone
    g = torch.Generator().manual_seed(0)
    many = [Detections(torch.rand(n, 4, generator=g).sort(1).values * 200 - 20,
                       torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g))
            for n in (25, 0, 40, 3)]
    scales, frames = [2.0, 1.0, 0.75, 3.3], [(40, 60), (10, 10), (150, 90), (33, 47)]
    together = frame_detections(many + [dets], scales + [2.0], frames + [(40, 60)], 0.3)
    assert len(together) == 5 and torch.equal(together[4].boxes, got.boxes)
    kept = sum(len(d.scores) for d in together[:4])
    assert 0 < kept < sum(int((d.scores >= 0.3).sum()) for d in many)  # some fell outside
    for d, scale, frame, joint in zip(many, scales, frames, together):
        alone, = frame_detections([d], [scale], [frame], 0.3)
        assert torch.equal(joint.boxes, alone.boxes) and torch.equal(joint.scores, alone.scores)
        assert torch.equal(joint.labels, alone.labels)
        want = [(b, s, lab) for b, s, lab in zip((d.boxes / scale).tolist(), d.scores.tolist(),
                                                  d.labels.tolist()) if s >= 0.3]
        want = [([min(max(v, 0.0), frame[1 - i % 2]) for i, v in enumerate(b)], s, lab)
                for b, s, lab in want]
        want = [w for w in want if w[0][2] > w[0][0] and w[0][3] > w[0][1]]
        assert alone.labels.tolist() == [lab for _, _, lab in want]
        torch.testing.assert_close(alone.boxes, torch.tensor([b for b, _, _ in want]).view(-1, 4))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bfloat16_on_cpu_stays_close_to_float32(vitdet):
    frames = frames_of(5, [(96, 96), (70, 96)])
    fp32 = StreamRunner(vitdet, build_method("none"), score_threshold=0.05)
    bf16_model = build_model(arch="vitdet-b", **VITDET)
    bf16_model.load_state_dict(vitdet.state_dict())
    bf16 = StreamRunner(bf16_model, build_method("none"), dtype=torch.bfloat16,
                        score_threshold=0.05)
    outs = bf16.step(frames, bf16.new_state(2))
    assert all(len(o.detections) > 0 for o in outs)
    assert outs[0].detections.boxes.dtype == torch.float32
    images = torch.stack([fp32.preprocess_detection(f)[0] for f in frames])
    with torch.no_grad():
        want = vitdet.backbone(images)
        got = bf16_model.backbone(images.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert relative_error(got, want) < 0.05


@pytest.mark.parametrize("arch, options, shape", [
    ("videomae-ti", dict(clip_frames=4), (2, 3, 4, 32, 32)),
    ("vivit-ti", dict(clip_frames=4, temporal_depth=1, tubelet=2), (2, 3, 4, 32, 32)),
    ("vit-ti", {}, (2, 3, 32, 32)),
])
def test_recognizers_in_bfloat16_and_float64(arch, options, shape):
    """Nothing in the model hard-codes float32: bf16 runs close, float64 agrees tightly."""
    torch.manual_seed(2)
    model = build_model(arch=arch, depth=1, dim=32, heads=2, input_size=32, num_classes=5,
                        **options)
    x = torch.randn(*shape)
    with torch.no_grad():
        want = model(x)
        got64 = model.to(torch.float64)(x.double())
        got16 = model.to(torch.bfloat16)(x.bfloat16())
    assert got64.dtype == torch.float64 and got16.dtype == torch.bfloat16
    torch.testing.assert_close(got64.float(), want, rtol=1e-4, atol=1e-5)
    assert relative_error(got16, want) < 0.05


def test_vivit_tubelets_through_the_runner():
    """A time step of the published ViViT is two frames: the runner collects them, and a clip
    equals the model run on the whole clip."""
    torch.manual_seed(3)
    model = build_model(arch="vivit-ti", depth=1, dim=32, heads=2, input_size=32, num_classes=5,
                        clip_frames=4, temporal_depth=1, tubelet=2)
    runner = StreamRunner(model, build_method("none"))
    video = [frames_of(step, [(32, 32), (32, 32)]) for step in range(5)]
    state = runner.new_state(2)
    outs = [runner.step(frames, state) for frames in video]
    # the backbone runs on every second frame only
    assert [o[0].gmacs_run > 0 for o in outs] == [False, True, False, True, False]
    clip = outs[3][1].clips[0]
    assert (clip.first_step, clip.last_step) == (0, 3)
    pre = torch.stack([runner.preprocess_recognition(video[s][1]) for s in range(4)], dim=1)
    with torch.no_grad():
        want = model(pre[None]).softmax(-1)[0]
    torch.testing.assert_close(clip.probs, want, rtol=1e-4, atol=1e-6)
    # a stream of a single frame still gets one clip at the end (its frame repeated)
    short = runner.new_state(1)
    runner.step([video[0][0]], short)
    ended = runner.finish(short)[0]
    assert len(ended.clips) == 1 and ended.clips[0].padded and ended.gmacs_run > 0
    pre = torch.stack([runner.preprocess_recognition(video[0][0])] * 4, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(ended.clips[0].probs, model(pre[None]).softmax(-1)[0],
                                   rtol=1e-4, atol=1e-6)
    # three frames: one whole time step and half of the next, which the last frame fills
    # (frames 0, 1, 2, 2), not a repeat of the whole first step
    short = runner.new_state(1)
    for step in range(3):
        runner.step([video[step][0]], short)
    clip, = runner.finish(short)[0].clips
    assert clip.padded and (clip.first_step, clip.last_step) == (0, 2)
    pre = torch.stack([runner.preprocess_recognition(video[s][0]) for s in (0, 1, 2, 2)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(clip.probs, model(pre[None]).softmax(-1)[0],
                                   rtol=1e-4, atol=1e-6)
