"""STA on the VideoMAE-style recognizer: dense at r = 0, the token schedule, a hand-worked
first slice and accumulation step, batching, the ledger, and the published ViT-B figure."""

import math

import pytest
import torch

from models import StreamRunner, build_arch, build_method
from models.ledger import Ledger
from models.methods import MethodError
from models.methods.sta import (accumulate, bipartite_drop, group_sizes, prune_stage,
                                semantic_score, stage_blocks)

OPTIONS = dict(depth=6, dim=32, heads=2, input_size=64, clip_frames=16, num_classes=5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_arch("videomae-s", **OPTIONS).eval()


@pytest.fixture(scope="module")
def clips(model, sample_videos):
    """Three real 16-frame clips (two videos), preprocessed as the runner does."""
    import decord

    prep = StreamRunner(model, build_method("none"))
    out = []
    for name, start in (("mma_test.mp4", 0), ("mma_test.mp4", 120),
                        ("decord_flipping_a_pancake.mkv", 30)):
        frames = decord.VideoReader(str(sample_videos / name)).get_batch(
            list(range(start, start + 16))).asnumpy()
        out.append(torch.stack([prep.preprocess_recognition(f) for f in frames], dim=1))
    return torch.stack(out)


def run(model, clips, method):
    led = Ledger(clips.shape[0])
    with torch.no_grad():
        emb = model.backbone.embed(clips, led)
        tokens = method.forward(model.backbone, emb, method.new_state(model.backbone, 1), led,
                                None)
        logits = model.forward_head(tokens, led)
    return tokens, logits, led


def test_r0_is_the_dense_model(model, clips):
    _, dense_logits, dense_led = run(model, clips, build_method("none"))
    _, logits, led = run(model, clips, build_method("sta", r=0))
    assert torch.equal(logits, dense_logits)
    assert led.run_macs().tolist() == dense_led.run_macs().tolist()


def test_token_counts_follow_the_decreasing_schedule(model, clips):
    # 8 slices of 4x4 tokens; stages after blocks 0, 2, 4 (depth 6); r = 4 per group
    assert stage_blocks(6) == (0, 2, 4)
    assert group_sizes(16, 8, 4) == [(8, 16), (4, 24), (2, 40)]
    tokens, _, led = run(model, clips, build_method("sta", r=4))
    # per slice: 16 -> 12 (r) -> 10 (r/2) -> 9 (r/4)
    assert tokens.shape == (3, 8 * 9, 32)
    per_block = [128, 96, 96, 80, 80, 72]
    assert led.tokens.tolist() == [float(sum(per_block))] * 3


def test_bipartite_drop_hand_worked():
    # first set: tokens 0, 2; second set: 1, 3. Token 0 matches token 1 exactly (1.0),
    # token 2 matches token 3 at 0.8: token 0 is the most redundant and goes.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    assert bipartite_drop(metric, 1).tolist() == [[1, 3, 2]]
    assert bipartite_drop(metric, 2).tolist() == [[1, 3]]


def test_accumulation_step_hand_worked():
    # previous slice kept tokens 1, 3, 2 (keys below), accumulated score all ones
    prev = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])
    cur = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]]])
    semantic = semantic_score(torch.tensor([[[1.0], [3.0], [2.0], [5.0]]]).unsqueeze(0))[0]
    assert semantic.tolist() == [[0.0, 0.5, 0.25, 1.0]]
    # logits cur . prev: rows are current tokens; softmax runs down each column
    logits = [[1.0, 0.6, 0.0], [0.0, 0.8, 1.0], [0.6, 1.0, 0.8], [0.8, 0.96, 0.6]]
    cols = [[math.exp(logits[i][j]) for i in range(4)] for j in range(3)]
    s = [sum(cols[j][i] / sum(cols[j]) for j in range(3)) for i in range(4)]
    assert s == pytest.approx([0.67310, 0.71612, 0.81108, 0.79971], abs=1e-5)
    # score = s * (1 - semantic) = 0.673, 0.358, 0.608, 0: token 0 goes although token 2
    # is the most redundant: its semantic score protects it
    kept, s_acc = accumulate(cur, prev, torch.ones(1, 3), semantic, 1)
    assert kept.tolist() == [[3, 1, 2]]
    total = s[3] + s[1] + s[2]
    assert s_acc[0].tolist() == pytest.approx([s[3] / total, s[1] / total, s[2] / total],
                                              abs=1e-6)
    assert s_acc[0].tolist() == pytest.approx([0.34368, 0.30776, 0.34856], abs=1e-5)


def test_stage_on_the_hand_example_and_the_authors_first_transition():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8],
                          [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]]])
    x = torch.tensor([[[10.0], [11.0], [12.0], [13.0], [1.0], [3.0], [2.0], [5.0]]])
    out = prune_stage(x, keys, groups=2, reverse=False, r=1)
    assert out[0, :, 0].tolist() == [11.0, 13.0, 12.0, 5.0, 3.0, 2.0]
    # reverse order: slice 1 goes first, by bipartite matching: its token 2 matches token 3
    # at 0.96 (token 0 matches token 3 at 0.8) and is dropped. Slice 0 then goes by
    # accumulation; the output stays in temporal order.
    rev = prune_stage(x, keys, groups=2, reverse=True, r=1)
    assert rev.shape == (1, 6, 1) and rev[0, 3:, 0].tolist() == [3.0, 5.0, 1.0]
    # the authors' code also transports score from the token the first slice dropped
    # (key (1, 0) once more): same choice here, different accumulated scores
    prev_all = keys[:, :4]
    semantic = torch.tensor([[0.0, 0.5, 0.25, 1.0]])
    kept, s_acc = accumulate(keys[:, 4:], prev_all, torch.ones(1, 4), semantic, 1)
    assert kept.tolist() == [[3, 1, 2]]
    s = torch.tensor([1.08629, 0.84489, 1.04571])
    assert s_acc[0].tolist() == pytest.approx((s / s.sum()).tolist(), abs=1e-5)
    out_all = prune_stage(x, keys, groups=2, reverse=False, r=1, first_transition="all")
    assert torch.equal(out_all, out)


def test_batching_clips_equals_running_them_alone(model, clips):
    method = build_method("sta", r=5)
    tokens, logits, led = run(model, clips, method)
    for i in range(clips.shape[0]):
        t1, l1, led1 = run(model, clips[i:i + 1], method)
        assert torch.allclose(t1[0], tokens[i], atol=1e-5)
        assert torch.allclose(l1[0], logits[i], atol=1e-5)
        assert led1.run_macs().tolist() == [led.run_macs()[i].item()]


def test_ledger_drops_with_r_and_includes_overhead(model, clips):
    runs, overheads = [], []
    for r in (0, 2, 4, 6):
        _, _, led = run(model, clips[:1], build_method("sta", r=r))
        runs.append(led.run_macs()[0].item())
        overheads.append(led.macs["overhead"][0].item())
    assert runs == sorted(runs, reverse=True) and len(set(runs)) == 4
    assert overheads[0] == 0 and all(o > 0 for o in overheads[1:])
    # through the runner: real frames in, a clip out, its cost below the dense cost
    runner = StreamRunner(model, build_method("sta", r=4))
    state = runner.new_state(1)
    frames = ((clips[0].permute(1, 2, 3, 0) * 57 + 115).clamp(0, 255)).to(torch.uint8)
    for t in range(16):
        outs = runner.step([frames[t]], state)
    (out,) = outs
    assert len(out.clips) == 1 and out.gmacs_overhead > 0
    assert out.gmacs_run < out.gmacs_dense and out.tokens_run < out.tokens_dense


@pytest.mark.parametrize("arch, r, published", [("videomae-b", 0, 180), ("videomae-b", 48, 116),
                                                ("videomae-s", 48, 35), ("videomae-l", 64, 308)])
def test_published_gflops_on_the_meta_device(arch, r, published):
    """Paper Table 2 (16x224, full model as fvcore counts it): counted, not predicted."""
    led = Ledger(1)
    with torch.device("meta"):
        m = build_arch(arch)
        method = build_method("sta", r=r)
        method.check(m)
        emb = m.backbone.embed(torch.zeros(1, 3, 16, 224, 224), led)
        m.forward_head(method.forward(m.backbone, emb, None, led, None), led)
    total = sum(v[0].item() for v in led.macs.values()) / 1e9
    assert total == pytest.approx(published, rel=0.01)


def test_refuses_what_it_cannot_run():
    with pytest.raises(MethodError):
        build_method("sta", r=-1)
    with pytest.raises(MethodError):
        build_method("sta", first_transition="both")
    tiny = build_arch("videomae-s", **OPTIONS)
    with pytest.raises(MethodError, match="too large"):
        build_method("sta", r=9).check(tiny)  # 16 tokens per slice: at most 8
    with pytest.raises(MethodError, match="multiple of 4"):
        build_method("sta").check(build_arch("videomae-s", **{**OPTIONS, "clip_frames": 4}))
    with pytest.raises(MethodError, match="frame"):
        build_method("sta").check(build_arch("vitdet-ti", depth=4, dim=32, heads=2,
                                             input_size=64))
