"""Eventful Transformers on real frames: exactness with every token, state isolation across
batched streams and segments, the ledger against a hand count and against Table C.

Run as a script to print GMACs per frame at the published scale (ViTDet-B, meta device):
``PYTHONPATH=. python -m tests.models.methods.test_eventful``.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from models import StreamRunner, build_method
from models.methods import MethodError
from models.methods.eventful import _block_tensors
from models.methods.gates import (Buffer, Gate, Threshold, TopFraction, TopR, give_back,
                                  release_spare_state, state_empty)

from .streams import (  # noqa: F401  (fixtures)
    VIDEOS,
    all_tokens,
    clips,
    meta_gmacs,
    run_backbone,
    vitdet,
    vivit,
)


def assert_same_tokens(steps, reference, atol=2e-5):
    for s, r in zip(steps, reference, strict=True):
        assert_close(s.tokens, r.tokens, atol=atol, rtol=1e-5)


def assert_incremental(steps):
    """Frames after the first took the gated path (it reports gate overhead)."""
    assert float(steps[0].ledger.macs["overhead"].sum()) == 0
    assert all(float(s.ledger.macs["overhead"].min()) > 0 for s in steps[1:])


# --- every token: the dense model, frame by frame --------------------------------------------

@pytest.mark.parametrize("policy", ["top_r", "threshold", "top_fraction"])
def test_all_tokens_reproduce_dense_vitdet(policy, clips):
    model = vitdet()
    frames = clips["mma_test.mp4"]
    dense, _ = run_backbone(model, build_method("none"), [frames])
    assert (dense[1].tokens - dense[0].tokens).abs().max() > 1e-2  # the frames do differ
    steps, _ = run_backbone(model, build_method("eventful", **all_tokens(policy, 196)), [frames])
    assert_incremental(steps)
    assert_same_tokens(steps, dense)

    found = 0
    runners = [StreamRunner(model, build_method(m, **o), score_threshold=0.12)
               for m, o in (("none", {}), ("eventful", all_tokens(policy, 196)))]
    states = [r.new_state(1) for r in runners]
    for frame in frames:
        want, got = (r.step([frame], s)[0].detections for r, s in zip(runners, states))
        assert torch.equal(got.labels, want.labels)
        assert_close(got.boxes, want.boxes, atol=1e-3, rtol=1e-5)
        assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)
        found += len(want)
    assert found > 0


@pytest.mark.parametrize("policy, options", [
    ("top_r", {}),                               # r = P + N: the class token counts in r
    ("top_fraction", {}),
    ("top_r", {"prefix": "always"}),
    # threshold 0 passes every token whose input changed at all; a bit-identical one (the
    # class token at block 0, static macroblocks of compressed video) is skipped, which is
    # exact for the token-wise ops but not for the attention-value update, whose changes
    # outside the selected columns the paper ignores on purpose. So on a model whose first
    # block is global, threshold 0 reproduces the dense model with dense attention only.
    ("threshold", {"sparse_attention": False}),
])
def test_all_tokens_reproduce_dense_vivit(policy, options, clips):
    model = vivit()
    frames = clips["mma_test.mp4"]
    dense, _ = run_backbone(model, build_method("none"), [frames])
    method = build_method("eventful", **all_tokens(policy, 50), **options)
    steps, _ = run_backbone(model, method, [frames])
    assert_incremental(steps)
    assert_same_tokens(steps, dense)

    probs = []
    for m in (build_method("none"), build_method("eventful", **all_tokens(policy, 50),
                                                  **options)):
        runner = StreamRunner(model, m)
        state = runner.new_state(1)
        clips_out = [c for f in frames[:4] for c in runner.step([f], state)[0].clips]
        probs.append(clips_out[0].probs)
    assert_close(probs[1], probs[0], atol=1e-5, rtol=1e-4)


def test_fewer_tokens_approximate_and_half_precision(clips):
    model = vitdet()
    frames = clips["mma_test.mp4"]
    dense, _ = run_backbone(model, build_method("none"), [frames])
    half, state = run_backbone(model, build_method("eventful", r=196, av_half=True), [frames])
    assert state.blocks[1].attention.a_ref_t.dtype == torch.bfloat16
    assert_same_tokens(half, dense, atol=2e-2)
    pruned, _ = run_backbone(model, build_method("eventful", r=48), [frames])
    err = [float((p.tokens - d.tokens).abs().mean()) for p, d in zip(pruned, dense)]
    assert err[0] < 1e-5 and 0 < err[-1] < 0.2 * float(dense[-1].tokens.abs().mean())


# --- state isolation ---------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"policy": "top_r", "r": 48},
                                     {"policy": "threshold", "threshold": 1.0}])
def test_batched_streams_match_each_stream_alone(options, clips):
    model = vitdet()
    streams = [clips[name] for name in VIDEOS]
    batched, _ = run_backbone(model, build_method("eventful", **options), streams)
    for i, frames in enumerate(streams):
        alone, _ = run_backbone(model, build_method("eventful", **options), [frames])
        for b, a in zip(batched, alone):
            assert_close(b.tokens[i:i + 1], a.tokens, atol=2e-5, rtol=1e-5)
            assert float(b.ledger.run_macs()[i]) == float(a.ledger.run_macs()[0])
            assert float(b.ledger.tokens[i]) == float(a.ledger.tokens[0])
            assert float(a.ledger.macs["padding"][0]) == 0
    padding = torch.stack([s.ledger.macs["padding"] for s in batched])
    if options["policy"] == "threshold":  # ragged: streams selected different counts
        assert float(padding.sum()) > 0
        assert len({float(x) for x in batched[2].ledger.tokens}) == 3
    else:
        assert float(padding.sum()) == 0


def test_select_keeps_streams_working(clips):
    model = vitdet()
    streams = [clips[name] for name in VIDEOS]
    options = {"policy": "threshold", "threshold": 1.0}
    method = build_method("eventful", **options)
    head, state = run_backbone(model, method, [s[:2] for s in streams])
    state = state.select(torch.tensor([2, 0]))
    tail, _ = run_backbone(model, method, [streams[2][2:], streams[0][2:]], state, first_step=2)
    for j, i in enumerate((2, 0)):
        alone, _ = run_backbone(model, build_method("eventful", **options), [streams[i]])
        got = [s.tokens[i:i + 1] for s in head] + [s.tokens[j:j + 1] for s in tail]
        for g, a in zip(got, alone):
            assert_close(g, a.tokens, atol=2e-5, rtol=1e-5)


def test_state_never_leaks_between_segments(clips):
    a, b = clips["mma_test.mp4"], clips["decord_flipping_a_pancake.mkv"]
    fresh, _ = run_backbone(vitdet(), build_method("eventful", r=48), [b])  # a fresh start
    model = vitdet()
    method = build_method("eventful", r=48)
    _, used = run_backbone(model, method, [a])
    reused, _ = run_backbone(model, method, [b], state=used)  # first frame flushes it
    new, _ = run_backbone(model, method, [b])                 # new state, same method
    for f, r, n in zip(fresh, reused, new):
        assert torch.equal(f.tokens, r.tokens) and torch.equal(f.tokens, n.tokens)
        assert torch.equal(f.ledger.run_macs(), r.ledger.run_macs())


def test_an_ended_state_gives_its_memory_to_the_next_first_frame(clips):
    """State memory is recycled on the CPU (a first frame otherwise faults in its pages):
    the next state's first frame takes an ended state's tensors, and its results are a
    fresh start's, bit for bit."""
    a, b = clips["mma_test.mp4"], clips["decord_flipping_a_pancake.mkv"]
    model = vitdet()
    method = build_method("eventful", r=48)
    release_spare_state()
    fresh, _ = run_backbone(model, method, [b])
    _, used = run_backbone(model, method, [a])
    held = {t.data_ptr() for t in _block_tensors(used.blocks)}
    assert len(held) == 4 * 6 + 2 * 3  # four blocks: gates, buffers; two global caches
    del used
    reused, state = run_backbone(model, method, [b])
    assert {t.data_ptr() for t in _block_tensors(state.blocks)} == held
    for f, r in zip(fresh, reused, strict=True):
        assert torch.equal(f.tokens, r.tokens)
        assert torch.equal(f.ledger.run_macs(), r.ledger.run_macs())
    # only tensors it made go back (nobody else may hold a view of them); a state of
    # another batch size frees the spare tensors of the same kind, keeps the others
    with torch.inference_mode():
        pair, single, other = (state_empty(s, torch.float32, "cpu") for s in
                               ((2, 3), (1, 3), (1, 4)))
        give_back([pair, other])
        give_back([single])
        assert state_empty((2, 3), torch.float32, "cpu").data_ptr() != pair.data_ptr()
        assert state_empty((1, 4), torch.float32, "cpu").data_ptr() == other.data_ptr()
        foreign = torch.ones(1, 5)
        give_back([foreign])
        assert state_empty((1, 5), torch.float32, "cpu").data_ptr() != foreign.data_ptr()
    release_spare_state()


# --- the ledger -----------------------------------------------------------------------------

def hand_count(n: int, sparse: bool = True) -> dict[str, int]:
    """MACs of ``vitdet(128, window=5, depth=2, global_blocks=(1,))`` per frame when every
    gate updates ``n`` of the T = 64 tokens (n = T: the dense first frame).

    8x8 grid; block 0 attends in 5x5 windows over the grid padded to 10x10 (4 windows of 25),
    block 1 globally; D = 192, 3 heads of c = 64, MLP 768; relative position in both.
    """
    t, d, hid, h, c = 64, 192, 768, 3, 64
    windows, w2, w = 4, 25, 5
    tokenwise = n * (d * 3 * d + 3 * d) + n * (d * d + d) + n * (d * hid + hid) \
        + n * (hid * d + d) + 2 * t * d                      # qkv, proj, fc1, fc2, residuals
    windowed = windows * h * (w2 * w2 * c * 2                # q k^T and A v per window
                              + w2 * 2 * w * c               # relative-position einsums
                              + 2 * w2 * w2)                 # both terms added to the logits
    rel_einsums = h * t * 2 * 8 * c                          # every query, both terms
    if n == t or not sparse:
        global_attention = 2 * h * t * t * c + rel_einsums + 2 * h * t * t
    else:  # rows and columns of q k^T and their two terms; A[:, S] dv + dA v_ref[S]
        global_attention = 2 * h * n * t * c + rel_einsums + 2 * 2 * h * n * t \
            + 2 * h * t * c * n
    backbone = 2 * tokenwise + windowed + global_attention
    if n == t:  # the first frame: dense, the state keeps the outputs (no extra work)
        return {"backbone": backbone, "overhead": 0}
    gates = 2 * 3 * (2 * t * d)                    # e = c - p and ||e||^2, three gates a block
    writes = 2 * (3 * n * d + n * (3 * d + d + d))  # references, then qkv/proj/mlp buffers
    attention = (2 * h * n * t                    # q k^T rows and columns written
                 + n * (h * t + h * c + h * t)    # dA, dv subtractions; A_ref columns written
                 + 2 * h * t * c) if sparse else 0  # both corrections added to the output
    return {"backbone": backbone, "overhead": gates + writes + attention}


@pytest.mark.parametrize("sparse", [True, False])
def test_ledger_matches_hand_count(sparse, clips):
    model = vitdet(128, depth=2, window=5, global_blocks=(1,))
    frames = clips["mma_test.mp4"][:2]
    steps, state = run_backbone(model, build_method("eventful", r=16,
                                                    sparse_attention=sparse), [frames])
    dense = StreamRunner(model, build_method("none")).dense_ledger("frame")
    assert float(dense.macs["backbone"][0]) == hand_count(64)["backbone"]
    for step, n in zip(steps, (64, 16)):
        want = hand_count(n, sparse)
        assert float(step.ledger.macs["backbone"][0]) == want["backbone"]
        assert float(step.ledger.macs["overhead"][0]) == want["overhead"]
        assert float(step.ledger.tokens[0]) == 2 * n
    # per block: 3 references (T x D), buffers T x 3D, T x D, T x D; the global block's
    # caches: q k^T and A (h x T x T each), the output (T x D); float32
    t, d, h = 64, 192, 3
    assert state.nbytes() == 4 * (2 * 8 * t * d + (2 * h * t * t + t * d if sparse else 0))


def test_ledger_drops_with_the_budget(clips):
    model = vitdet()
    frames = clips["mma_test.mp4"][:3]
    dense = float(StreamRunner(model, build_method("none")).dense_ledger("frame").run_macs()[0])
    runs, overheads = [], []
    for r in (96, 48, 12):
        steps, _ = run_backbone(model, build_method("eventful", r=r), [frames])
        assert float(steps[0].ledger.run_macs()[0]) == dense  # first frame: dense
        runs.append(float(steps[-1].ledger.run_macs()[0]))
        overheads.append(float(steps[-1].ledger.macs["overhead"][0]))
    assert dense > runs[0] > runs[1] > runs[2]
    assert all(o > 0 for o in overheads)


def published_scale(resolution: int, r: int, **options) -> float:
    """Steady-state backbone GMACs per frame of ViTDet-B (the second frame of a stream)."""
    return sum(meta_gmacs("vitdet-b", resolution, build_method("eventful", r=r, **options))[1]
               [k] for k in ("backbone", "overhead"))


@pytest.mark.parametrize("resolution, r, published, options", [
    (1024, 1024, 156.8, {}), (672, 512, 60.7, {}),
    (1024, 512, 164.0, {"sparse_attention": False}),  # "Token-wise only"
])
def test_published_scale_matches_table_c(resolution, r, published, options):
    # Table C averages whole videos, dense first frames included; a steady-state frame is a
    # little cheaper (and our overhead counts norms and writes the authors do not)
    assert published_scale(resolution, r, **options) == pytest.approx(published, rel=0.02)


# --- gates, policies, buffers ------------------------------------------------------------

def test_gate_accumulates_error_until_it_fires():
    gate = Gate(Threshold(1.0))
    c = torch.zeros(1, 2, 4)
    gate.flush(c.clone())
    fired = []
    for step in range(1, 5):  # token 0 drifts 0.4 per frame, token 1 stays
        c = c.clone()
        c[0, 0, 0] += 0.4
        sel, rows = gate(c, _ledger())
        fired.append(sel.index[0].tolist())
        assert torch.equal(rows, sel.rows(c))
    assert fired == [[], [], [0], []]  # 0.4, 0.8, 1.2 -> update, then 0.4 again


def test_policies_and_ragged_selection():
    norms = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sorted(TopR(2)(norms).index[0].tolist()) == [1, 3]
    assert TopR(9)(norms).width == 4 and TopFraction(0.5)(norms).width == 2
    sel = Threshold(0.5)(norms)
    assert sel.width == 3 and sel.count.tolist() == [3, 1] and sel.padding.tolist() == [0, 2]
    # every layer run on a selection counts it: the counts are computed once
    assert sel.count is sel.count and sel.padding is sel.padding
    target = torch.zeros(2, 4, 1)
    sel.write_rows(target, torch.ones(2, 3, 1))
    assert target[..., 0].tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]  # padding rows not written
    square = torch.zeros(2, 1, 4, 4)
    sel.write_columns(square, torch.ones(2, 1, 4, 3))
    assert square[:, 0, 0].tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    assert sel.columns(square)[:, 0, 0].sum(1).tolist() == [3, 1]
    assert Threshold(9.0)(norms).width == 0
    # one selection reads rows of tensors of several layouts (its row positions are kept
    # per layout): each read is the plain gather along the token dimension
    for shape in [(2, 4, 5), (2, 3, 4, 2), (2, 4, 5), (2, 3, 4, 2)]:
        x = torch.randn(shape)
        index = sel.index.view(2, *[1] * (len(shape) - 3), 3, 1).expand(*shape[:-2], 3, shape[-1])
        assert torch.equal(sel.rows(x), x.gather(-2, index))


def test_prefix_always_and_buffer_never_aliased():
    gate = Gate(TopR(2), always=1)
    gate.flush(torch.zeros(1, 4, 2))
    c = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [2.0, 0.0]]])
    sel, _ = gate(c, _ledger())
    assert sorted(sel.index[0].tolist()) == [0, 2]  # the class token despite zero error
    buf = Buffer()
    buf.fill(torch.zeros(1, 4, 2))
    x = torch.ones(1, 4, 2)
    y = buf.add_to(x)
    y += 1
    buf.rows(sel).add_(1)
    assert float(buf.value.abs().sum()) == 0 and float(x.sum()) == 8


@pytest.mark.parametrize("options", [{"policy": "nope"}, {"r": 0}, {"r": 1.5},
                                     {"policy": "threshold", "threshold": -1.0},
                                     {"policy": "top_fraction", "fraction": 0.0},
                                     {"prefix": "sometimes"}, {"radius": 2},
                                     # half-precision A v is part of the sparse attention
                                     {"sparse_attention": False, "av_half": True}])
def test_bad_parameters_are_refused(options):
    with pytest.raises(MethodError):
        build_method("eventful", **options)


def _ledger():
    from models.ledger import Ledger

    return Ledger(1)


if __name__ == "__main__":  # the published-scale table (meta device, a few seconds)
    # Table C averages whole videos, each starting with a dense frame: a video of M frames
    # averages (dense + (M - 1) x steady) / M, so "frames" is the M that closes the gap.
    print("ViTDet-B backbone GMACs per steady-state frame (MACs, as the papers' 'FLOPs')")
    table_c = {(1024, 2048): (294.9, 294.1), (1024, 1024): (156.8, 207.3),
               (1024, 512): (87.8, 164.0), (672, 1024): (115.1, 111.9), (672, 512): (60.7, 68.5)}
    dense = {res: sum(meta_gmacs("vitdet-b", res, build_method("none"), 1)[0][k]
                      for k in ("backbone", "overhead")) for res in (1024, 672)}
    print("res     r | eventful Table C frames | token-wise Table C frames")
    for (res, r), published in table_c.items():
        cells = []
        for options, pub in zip(({}, {"sparse_attention": False}), published):
            ours = published_scale(res, r, **options)
            frames = f"{(dense[res] - ours) / (pub - ours):6.0f}" if pub > ours else "     -"
            cells.append(f"{ours:8.1f} {pub:7.1f} {frames}")
        print(f"{res:4d} {r:5d} | " + " | ".join(cells))
