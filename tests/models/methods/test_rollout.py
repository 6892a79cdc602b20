"""Rollout-guided token pruning (models/methods/rollout.py) on real frames.

Tiny random-init models, seeded: ViTDet-Ti (4 blocks, windows of 8 on a 14x14 grid, so window
padding is exercised; global blocks 1 and 3) and a 2-block ViViT-Ti. Frames come from the
sample clips, letterboxed to a square, so square-padding tokens are exercised too.
"""

import itertools
import math

import pytest
import torch

from models import build_arch, build_method, build_model, StreamRunner
from models.heads import Detections
from models.ledger import Ledger
from models.methods import MethodError
from models.methods.base import StepContext
from models.methods.rollout import (fuse_heads, paint_anchors, rollout, row_norms, top_k,
                                    track)

from .streams import random_rel_pos

VIDEOS = ("mma_test.mp4", "decord_flipping_a_pancake.mkv", "mma_test.avi")  # 3 aspect ratios
N = 196  # 14 x 14 tokens at 224


@pytest.fixture(scope="module")
def clips(sample_videos):
    import decord

    out = []
    for name in VIDEOS:
        reader = decord.VideoReader(str(sample_videos / name))
        out.append([reader[i].asnumpy() for i in range(0, 20, 4)])  # 5 frames, some motion
    return out


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return random_rel_pos(build_model(arch="vitdet-ti", input_size=224, depth=4, window=8,
                                      global_blocks=(1, 3), neck_channels=64))


@pytest.fixture(scope="module")
def vivit():
    torch.manual_seed(0)
    return build_model(arch="vivit-ti", input_size=112, depth=2, clip_frames=4,
                       temporal_depth=1, num_classes=10)


@pytest.fixture(scope="module")
def dense_run(detector, clips):
    return run(detector, build_method("none"), clips[:1])


def run(model, method, streams, runner=None):
    """Step ``streams`` (lists of frames, same length) together; per step, the outputs and the
    final backbone tokens the head got."""
    runner = runner or StreamRunner(model, method, score_threshold=0.05)
    seen = []
    hook = model.backbone.norm.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    try:
        state = runner.new_state(len(streams))
        outs = [runner.step([s[t] for s in streams], state) for t in range(len(streams[0]))]
    finally:
        hook.remove()
    return outs, seen


def assert_same_detections(a: Detections, b: Detections, atol=1e-4):
    assert len(a) == len(b)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=1e-4)


# --- equivalence with the dense model ---------------------------------------------------------

def test_refresh_every_frame_is_exactly_the_dense_model(detector, clips, dense_run):
    dense, dense_tokens = dense_run
    outs, tokens = run(detector, build_method("rollout", k=N, refresh=1), clips[:1])
    for d, o, dt, t in zip(dense, outs, dense_tokens, tokens):
        assert torch.equal(dt, t)
        assert_same_detections(d[0].detections, o[0].detections, atol=0)
        assert o[0].gmacs_run == o[0].gmacs_dense and o[0].gmacs_overhead == 0


@pytest.mark.parametrize("options", [{}, {"rollout_blocks": "global", "fusion": "rms"}])
def test_keeping_every_token_without_refresh_matches_dense(detector, clips, dense_run, options):
    """With K = N every token is recomputed from the current frame (caches fully refreshed),
    so the result is the dense model's, up to float rounding: the method computes attention
    explicitly (it needs the probabilities) where the dense path uses the fused kernel."""
    dense, dense_tokens = dense_run
    outs, tokens = run(detector, build_method("rollout", k=N, refresh=0, **options), clips[:1])
    for t, (d, o, dt, pt) in enumerate(zip(dense, outs, dense_tokens, tokens)):
        torch.testing.assert_close(pt, dt, atol=1e-4, rtol=1e-4)
        assert_same_detections(d[0].detections, o[0].detections)
        # the backbone work is exactly the dense model's; the method's overhead comes on top
        assert o[0].gmacs_run - o[0].gmacs_overhead == pytest.approx(o[0].gmacs_dense, rel=1e-12)
        assert o[0].gmacs_overhead > 0


def test_recorded_attention_is_the_dense_models_and_caches_change_only_kept_rows(detector,
                                                                                 clips):
    frames = clips[0]
    runner = StreamRunner(detector, build_method("rollout", k=N, refresh=0))
    state = runner.new_state(1)
    for f in frames[:2]:
        runner.step([f], state)
    image = runner.preprocess_detection(frames[1])[0][None]
    with torch.inference_mode():
        emb = detector.backbone.embed(image)
        _, probs = detector.backbone.forward_blocks(emb.tokens, emb.grid, need_probs=True)
    for recorded, p in zip(state.method.attn, probs):
        torch.testing.assert_close(recorded, fuse_heads(p, "mean").view(recorded.shape),
                                   atol=1e-5, rtol=1e-4)

    k = 64
    runner = StreamRunner(detector, build_method("rollout", k=k, refresh=0))
    state = runner.new_state(1)
    for f in frames[:2]:
        runner.step([f], state)
    s = state.method
    before = [t.clone() for t in (s.attn[1], s.attn[3], s.cache[1], s.cache[2], s.cache[3],
                                  s.output)]
    runner.step([frames[2]], state)
    after = (s.attn[1], s.attn[3], s.cache[1], s.cache[2], s.cache[3], s.output)
    changed = [set((a != b).any(-1)[0].nonzero()[:, 0].tolist()) for a, b in zip(before, after)]
    # global rows, k/v and q/k/v caches, output buffer: the same k tokens, nothing else
    assert len(changed[0]) == k and all(c == changed[0] for c in changed)


# --- the parts --------------------------------------------------------------------------------

def explicit_rollout(matrices: list[torch.Tensor], s_last: torch.Tensor) -> torch.Tensor:
    """s_0 = (A_L ... A_1)^T s_L with the full product of row-normalised (B, n, n) matrices."""
    product = torch.eye(s_last.shape[1], dtype=torch.float64).expand_as(matrices[0])
    for a in matrices:
        product = a @ product
    return (product.transpose(1, 2) @ s_last[..., None])[..., 0]


def normalised(fused: torch.Tensor) -> torch.Tensor:
    a = fused + torch.eye(fused.shape[-1], dtype=fused.dtype)
    return a / a.sum(-1, keepdim=True)


def random_probs(*shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).mul(3).softmax(-1)


@pytest.mark.parametrize("fusion", ["mean", "rms"])
def test_rollout_by_matrix_vector_products_equals_the_matrix_product(fusion):
    torch.manual_seed(1)
    b, heads, grid, w = 2, 3, (3, 5), 2  # windows of 2 on a 3x5 grid: padded to 4x6, 6 windows
    n = grid[0] * grid[1]
    hp, wp = 4, 6
    # blocks: windowed, global, windowed, global
    probs = [random_probs(b * 6, heads, w * w, w * w), random_probs(b, heads, n, n),
             random_probs(b * 6, heads, w * w, w * w), random_probs(b, heads, n, n)]
    fused = [fuse_heads(p, fusion) for p in probs]
    expected_fused = probs[1].mean(1) if fusion == "mean" else probs[1].square().mean(1).sqrt()
    torch.testing.assert_close(fused[1], expected_fused)
    if fusion == "rms":  # rows no longer sum to 1: the normalisation matters
        assert not torch.allclose(fused[1].sum(-1), torch.ones(b, n, dtype=torch.float64))

    # explicit windowed matrices: block-diagonal over the padded grid, row-normalised there,
    # then restricted to the real tokens (padding is no input token: its importance is lost)
    real = torch.tensor([y * wp + x for y in range(grid[0]) for x in range(grid[1])])
    matrices = []
    for f in fused:
        if f.shape[-1] == n:
            matrices.append(normalised(f))
            continue
        full = torch.zeros(b, hp * wp, hp * wp, dtype=torch.float64)
        for win, (wy, wx) in enumerate(itertools.product(range(hp // w), range(wp // w))):
            pos = torch.tensor([(wy * w + i) * wp + wx * w + j for i in range(w) for j in range(w)])
            full[:, pos[:, None], pos[None, :]] = f.view(b, 6, w * w, w * w)[:, win]
        matrices.append(normalised(full)[:, real][:, :, real])

    s_last = torch.rand(b, n, dtype=torch.float64)
    s_last /= s_last.sum(1, keepdim=True)
    windowed = [f.view(b, 6, w * w, w * w) if f.shape[-1] != n else f for f in fused]
    ledger = Ledger(b)
    got = rollout(s_last, windowed, [row_norms(f) for f in windowed], [w, 0, w, 0], grid, n,
                  ledger=ledger)
    torch.testing.assert_close(got, explicit_rollout(matrices, s_last))
    per_window_block = 6 * (w ** 4 + 2 * w * w)
    assert ledger.macs["overhead"].tolist() == [2 * per_window_block + 2 * (n * n + 2 * n)] * b


def test_rollout_with_tokens_dropped_after_block_0():
    """Recognizer variant: blocks 1.. ran on kept tokens only; their importance goes back to
    the input through block 0's full attention, pruned tokens getting none past block 0."""
    torch.manual_seed(2)
    b, heads, n = 2, 2, 6
    keep = torch.tensor([[0, 2, 3], [0, 1, 5]])  # the class token and two grid tokens
    p0, p1 = random_probs(b, heads, n, n), random_probs(b, heads, 3, 3)
    f0, f1 = fuse_heads(p0, "mean"), fuse_heads(p1, "mean")
    s_last = torch.zeros(b, 3, dtype=torch.float64)
    s_last[:, 0] = 1
    got = rollout(s_last, [f0, f1], [row_norms(f0), row_norms(f1)], [0, 0], (1, n - 1), n,
                  keep=keep)
    # explicit: block 1 as an n x n matrix on the kept rows/columns, pruned rows empty
    a1 = torch.zeros(b, n, n, dtype=torch.float64)
    for i in range(b):
        a1[i, keep[i][:, None], keep[i][None, :]] = normalised(f1)[i]
    s_full = torch.zeros(b, n, dtype=torch.float64).scatter(1, keep, s_last)
    expected = normalised(f0).transpose(1, 2) @ (a1.transpose(1, 2) @ s_full[..., None])
    torch.testing.assert_close(got, expected[..., 0])


def test_tracking_follows_motion_and_never_picks_padding():
    h, w, d = 4, 5, 24
    prev = torch.eye(h * w, d).view(h, w, d)      # orthonormal patch embeddings
    importance = torch.arange(1.0, h * w + 1)     # all distinct
    cur = torch.zeros(h, w, d)
    cur[:, 1:] = prev[:, :-1]                      # the content moved one token to the right
    for y in range(h):                             # left column: the source is off the grid;
        nbrs = prev[max(y - 1, 0):y + 2, :2].reshape(-1, d)  # every real neighbour scores < 0
        cur[y, 0] = -nbrs.sum(0) + 0.5 * prev[y, 0]          # (off-grid zeros would score 0)
    prev_valid = torch.ones(h * w, dtype=torch.bool)
    prev_valid[1 * w + 1] = False                  # square padding in the previous frame
    ledger = Ledger(1)
    got = track(importance[None], prev.view(1, -1, d), prev_valid[None], cur.view(1, -1, d),
                (h, w), 1, ledger).view(h, w)
    expected = torch.zeros(h, w)
    expected[:, 1:] = importance.view(h, w)[:, :-1]
    expected[:, 0] = importance.view(h, w)[:, 0]   # the best real neighbour, not padding
    expected[1, 2] = importance.view(h, w)[1, 2]   # its source is padding: ties stay in place
    assert torch.equal(got, expected)
    assert ledger.macs["overhead"].tolist() == [9 * h * w * d]

    still = track(importance[None], prev.view(1, -1, d), prev_valid[None], cur.view(1, -1, d),
                  (h, w), 0)
    assert torch.equal(still, importance.masked_fill(~prev_valid, 0)[None])


def test_top_k_prefers_real_pixels_and_spreads_background_samples():
    score = torch.tensor([[0.9, 0.1, 0.5, 0.8, 0.0, 0.3, 0.2, 0.7]])
    valid = torch.tensor([[True, True, True, False, True, True, True, True]])
    assert top_k(score, valid, 3).tolist() == [[0, 2, 7]]      # 0.8 is padding
    assert top_k(score, valid, 8).tolist() == [list(range(8))]  # padding only to fill k
    assert top_k(score, None, 3).tolist() == [[0, 3, 7]]
    # 2 by score (0, 7), then 2 spread over the 5 other real tokens 1, 2, 4, 5, 6 in raster order
    assert top_k(score, valid, 4, background=2).tolist() == [[0, 1, 4, 7]]


def test_anchor_painting():
    grid, size = (4, 4), (64, 64)  # 16-pixel patches
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[:, 12:] = False          # bottom row is square padding
    dets = [Detections(torch.tensor([[20.0, 5, 40, 20], [0, 0, 64, 64]]), torch.tensor([0.5, 0.1]),
                       torch.tensor([0, 1])),                      # the second is not > 0.1
            Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)),
            Detections(torch.tensor([[0.0, 50, 64, 64]]), torch.tensor([0.9]), torch.tensor([0]))]
    anchors = paint_anchors(dets, grid, size, 0.1, valid).view(3, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 1:3] = True
    assert torch.equal(anchors[0], expected)
    assert torch.equal(anchors[1], valid[1].view(4, 4))    # no box: every real token
    assert torch.equal(anchors[2], valid[2].view(4, 4))    # a box on padding only: the same


def test_anchors_of_many_streams_are_each_streams_own():
    """Painted together, each stream's anchors are those of its own boxes alone (random boxes,
    some past the image's edges, streams with none)."""
    g = torch.Generator().manual_seed(0)
    grid, size = (6, 5), (96, 80)
    dets = []
    for i in range(7):
        n = [0, 1, 4, 9][i % 4]
        corner = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 96.0]) - 10  # x, y
        extent = torch.rand(n, 2, generator=g) * 40
        dets.append(Detections(torch.cat([corner, corner + extent], 1),
                               torch.rand(n, generator=g), torch.zeros(n, dtype=torch.long)))
    valid = torch.rand(7, 30, generator=g) > 0.2
    for v in (valid, None):
        together = paint_anchors(dets, grid, size, 0.3, v)
        for i, d in enumerate(dets):
            alone = paint_anchors([d], grid, size, 0.3, None if v is None else v[i:i + 1])
            assert torch.equal(together[i], alone[0])
    # and one stream alone is the definition: patches a box above the threshold overlaps
    boxes = dets[3].boxes[dets[3].scores > 0.3]
    want = torch.zeros(6, 5, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        for r in range(6):
            for c in range(5):
                overlap_y = r * 16 < y1 and (r + 1) * 16 > y0
                overlap_x = c * 16 < x1 and (c + 1) * 16 > x0
                want[r, c] |= overlap_y and overlap_x
    assert want.any() and not want.all()
    assert torch.equal(paint_anchors([dets[3]], grid, size, 0.3, None)[0].view(6, 5), want)


# --- streams ----------------------------------------------------------------------------------

def test_batched_streams_equal_each_stream_alone_and_select(detector, clips):
    method = build_method("rollout", k=64, refresh=4)
    batched, batched_tokens = run(detector, method, clips)
    alone = [run(detector, method, [c]) for c in clips]
    for i, (outs, tokens) in enumerate(alone):
        for t in range(len(outs)):
            torch.testing.assert_close(batched_tokens[t][i], tokens[t][0], atol=1e-5, rtol=1e-5)
            assert_same_detections(batched[t][i].detections, outs[t][0].detections)
            assert batched[t][i].gmacs_run == pytest.approx(outs[t][0].gmacs_run, rel=1e-12)
    assert batched[1][0].gmacs_run < 0.6 * batched[1][0].gmacs_dense  # frame 1 was pruned

    # streams 2 and 0 go on after stream 1 leaves the batch at frame 2
    runner = StreamRunner(detector, method, score_threshold=0.05)
    state = runner.new_state(3)
    for t in range(2):
        runner.step([c[t] for c in clips], state)
    state = runner.select(state, [2, 0])
    for t in range(2, 5):
        outs = runner.step([clips[2][t], clips[0][t]], state)
        assert_same_detections(outs[0].detections, alone[2][0][t][0].detections)
        assert_same_detections(outs[1].detections, alone[0][0][t][0].detections)

    # the same runner (and method object) on a new segment: nothing carried over
    runner_outs, _ = run(detector, method, [clips[1][2:]], runner=runner)
    fresh_outs, _ = run(detector, build_method("rollout", k=64, refresh=4), [clips[1][2:]])
    for a, b in zip(runner_outs, fresh_outs):
        assert_same_detections(a[0].detections, b[0].detections, atol=0)


# --- the ledger -------------------------------------------------------------------------------

def hand_count(kept: int, fusion: str, blocks: str) -> dict[str, int]:
    """MACs of one frame of the test detector (ViTDet-Ti layout, 4 blocks, global 1 and 3,
    14x14 tokens, windows of 8 padded to 16x16), ``kept`` tokens past block 0's attention.

    ``backbone``; ``choose``: the overhead of picking the tokens (anchors, rollout, tracking);
    ``record``: the overhead of keeping this frame's attention for the next frame's rollout.
    """
    d, heads, c, hidden, n, side, w, windows = 192, 3, 64, 768, N, 14, 8, 4

    def linear(i, o, tokens):
        return tokens * (i * o + o)

    def token_ops(m):  # qkv, projection, MLP, both residuals
        return (linear(d, 3 * d, m) + linear(d, d, m) + linear(d, hidden, m)
                + linear(hidden, d, m) + 2 * m * d)

    windowed = heads * windows * (2 * w ** 4 * c + w * w * 2 * w * c + 2 * w ** 4)

    def global_attention(m):  # q k^T, attention x v, relative position terms and additions
        return heads * (2 * m * n * c + m * 2 * side * c + 2 * m * n)

    block0 = (linear(d, 3 * d, n) + linear(d, d, n) + n * d + windowed
              + linear(d, hidden, kept) + linear(hidden, d, kept) + kept * d)
    backbone = block0 + 3 * token_ops(kept) + windowed + 2 * global_attention(kept)
    per_fused = heads if fusion == "mean" else heads + 1
    record = 2 * (per_fused + 1) * kept * n             # global blocks: rows of kept tokens
    choose = 2 * n + 2 * (n * n + 2 * n) + 9 * n * d    # anchors, global steps, tracking
    if blocks == "all":                                 # windowed blocks 0 and 2
        record += 2 * (per_fused + 1) * windows * w ** 4
        choose += 2 * windows * (w ** 4 + 2 * w * w)
    return {"backbone": backbone, "choose": choose, "record": record}


@pytest.mark.parametrize("fusion, blocks", [("mean", "all"), ("rms", "global")])
def test_ledger_matches_a_hand_count(detector, clips, fusion, blocks):
    k = 64
    outs, _ = run(detector, build_method("rollout", k=k, refresh=3, fusion=fusion,
                                         rollout_blocks=blocks), clips[:1])
    dense, pruned = hand_count(N, fusion, blocks), hand_count(k, fusion, blocks)
    # frame 0 dense (records for frame 1); 1 pruned; 2 pruned (frame 3 is dense: records
    # nothing); 3 a dense refresh
    expected = [(dense["backbone"], dense["record"]),
                (pruned["backbone"], pruned["choose"] + pruned["record"]),
                (pruned["backbone"], pruned["choose"]),
                (dense["backbone"], dense["record"])]
    for o, (backbone, overhead) in zip(outs, expected):
        o = o[0]
        assert o.gmacs_overhead * 1e9 == pytest.approx(overhead, rel=1e-12)
        assert o.gmacs_run * 1e9 == pytest.approx(backbone + overhead, rel=1e-12)
    assert outs[0][0].gmacs_run - outs[0][0].gmacs_overhead == pytest.approx(
        outs[0][0].gmacs_dense, rel=1e-12)
    assert [o[0].tokens_run for o in outs[:4]] == [4 * N, 4 * k, 4 * k, 4 * N]


def test_executed_macs_drop_with_k(detector, clips):
    pruned = []
    for k in (N, 128, 64, 16):
        outs, _ = run(detector, build_method("rollout", k=k, refresh=0), [clips[0][:2]])
        pruned.append(outs[1][0].gmacs_run)
    assert pruned == sorted(pruned, reverse=True) and len(set(pruned)) == 4


@pytest.mark.parametrize("resolution, k, published", [(672, 384, 62.1), (1024, 750, 152.4)])
def test_vitdet_b_operating_points_near_published(resolution, k, published):
    """ViTDet-B backbone GMACs per frame averaged over a refresh cycle of 8 (frame 0 dense, 7
    pruned), counted on the meta device. Ours are 1.5-1.7% below the paper's 62.1 and 152.4:
    the authors' code pads the kept queries of a global block back to the full grid to add
    relative position, so it computes (and counts) those terms for all N queries, where we
    compute them for the K kept ones (see the report on issue 4)."""
    with torch.device("meta"):
        model = build_arch("vitdet-b", input_size=resolution)
    backbone, method = model.backbone, build_method("rollout", k=k)
    state = method.new_state(backbone, 1)
    total = 0.0
    for t in range(8):
        ledger = Ledger(1)
        emb = backbone.embed(torch.zeros(1, 3, resolution, resolution, device="meta"), ledger)
        method.forward(backbone, emb, state, ledger, StepContext(None, t == 0, (resolution,) * 2))
        total += float(ledger.run_macs()[0]) / 1e9
    assert total / 8 == pytest.approx(published, rel=0.025)
    assert total / 8 < published


# --- the recognizer variant -------------------------------------------------------------------

def test_vivit_recognizer_variant(vivit, clips):
    n = 49  # 7 x 7 tokens at 112
    dense, _ = run(vivit, build_method("none"), clips[:1])
    keep_all, _ = run(vivit, build_method("rollout", k=n, refresh=0), clips[:1])
    clip = next(t for t, o in enumerate(dense) if o[0].clips)
    torch.testing.assert_close(keep_all[clip][0].clips[0].probs, dense[clip][0].clips[0].probs,
                               atol=1e-5, rtol=1e-4)

    method = build_method("rollout", k=20, refresh=3, background=5)
    batched, _ = run(vivit, method, clips[:2])
    for i in range(2):
        alone, _ = run(vivit, method, [clips[i]])
        torch.testing.assert_close(batched[clip][i].clips[0].probs, alone[clip][0].clips[0].probs)
    # pruned tokens are dropped after block 0: both blocks' MLPs see the class token + 20
    assert [o[0].tokens_run for o in batched[:3]] == [2 * (1 + n), 2 * 21, 2 * 21]
    assert batched[1][0].gmacs_run < 0.6 * batched[1][0].gmacs_dense
    assert not torch.allclose(batched[clip][0].clips[0].probs, dense[clip][0].clips[0].probs)


# --- user mistakes ----------------------------------------------------------------------------

def test_bad_parameters_and_models_are_clear_errors(detector, vivit, clips):
    for params in [{}, {"k": 0}, {"k": 8, "fusion": "max"}, {"k": 8, "rollout_blocks": "some"},
                   {"k": 8, "background": 9}, {"k": 8, "refresh": -1}, {"k": 8, "window": -1}]:
        with pytest.raises(MethodError):
            build_method("rollout", **params)
    with pytest.raises(MethodError, match="exceeds"):
        run(detector, build_method("rollout", k=N + 1), [clips[0][:1]])
    for arch in ("videomae-ti", "vit-ti"):
        with torch.device("meta"):
            model = build_arch(arch, depth=1)
        with pytest.raises(MethodError):
            build_method("rollout", k=8).check(model)
    build_method("rollout", k=8).check(vivit)
    assert math.isclose(build_method("rollout", k=8).describe()["score_threshold"], 0.1)
