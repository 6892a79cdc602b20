"""The STGT baseline: previous-frame gates on the token-wise ops, attention dense."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from models import build_method
from models.ledger import Ledger
from models.methods import MethodError
from models.methods.gates import PreviousFrameGate, Threshold

from .streams import (  # noqa: F401  (fixtures)
    VIDEOS,
    all_tokens,
    clips,
    run_backbone,
    vitdet,
    vivit,
)
from .test_eventful import hand_count


@pytest.mark.parametrize("make_model, tokens, policy", [
    (vitdet, 196, "top_r"), (vitdet, 196, "threshold"), (vivit, 50, "threshold")])
def test_all_tokens_reproduce_dense(make_model, tokens, policy, clips):
    # token-wise ops only: a token skipped at threshold 0 had a bit-identical input, so even
    # the class token (constant at block 0) costs no accuracy
    model = make_model()
    frames = clips["mma_test.mp4"]
    dense, _ = run_backbone(model, build_method("none"), [frames])
    steps, _ = run_backbone(model, build_method("stgt", **all_tokens(policy, tokens)), [frames])
    assert all(float(s.ledger.macs["overhead"][0]) > 0 for s in steps[1:])
    for s, d in zip(steps, dense):
        assert_close(s.tokens, d.tokens, atol=2e-5, rtol=1e-5)


def test_previous_frame_gate_never_accumulates():
    gate = PreviousFrameGate(Threshold(1.0))
    c = torch.zeros(1, 2, 4)
    gate.flush(c)
    for _ in range(4):  # token 0 drifts 0.4 per frame: never 1.0 from the previous frame
        c = c.clone()
        c[0, 0, 0] += 0.4
        sel, _ = gate(c, Ledger(1))
        assert sel.width == 0
    assert gate.ref is c


def test_differs_from_eventful_gates_after_the_second_frame(clips):
    # frame 1 compares with frame 0 under both gates; from frame 2 on the references differ
    model = vitdet()
    frames = clips["mma_test.mp4"]
    stgt, _ = run_backbone(model, build_method("stgt", r=48), [frames])
    tokenwise, _ = run_backbone(model, build_method("eventful", r=48, sparse_attention=False),
                                [frames])
    assert torch.equal(stgt[1].tokens, tokenwise[1].tokens)
    assert not torch.allclose(stgt[-1].tokens, tokenwise[-1].tokens, atol=1e-3)


def test_ledger_is_token_wise_only_without_reference_writes(clips):
    model = vitdet(128, depth=2, window=5, global_blocks=(1,))
    steps, _ = run_backbone(model, build_method("stgt", r=16), [clips["mma_test.mp4"][:2]])
    want = hand_count(16, sparse=False)
    assert float(steps[0].ledger.macs["backbone"][0]) == hand_count(64)["backbone"]
    assert float(steps[1].ledger.macs["backbone"][0]) == want["backbone"]
    # swapping in the current frame as reference writes nothing: 2 blocks x 3 gates x r x D
    assert float(steps[1].ledger.macs["overhead"][0]) == want["overhead"] - 2 * 3 * 16 * 192


def test_batched_ragged_streams_match_alone(clips):
    model = vitdet()
    streams = [clips[name] for name in VIDEOS]
    options = {"policy": "threshold", "threshold": 1.0}
    batched, _ = run_backbone(model, build_method("stgt", **options), streams)
    assert float(sum(s.ledger.macs["padding"].sum() for s in batched)) > 0
    for i, frames in enumerate(streams):
        alone, _ = run_backbone(model, build_method("stgt", **options), [frames])
        for b, a in zip(batched, alone):
            assert_close(b.tokens[i:i + 1], a.tokens, atol=2e-5, rtol=1e-5)
            assert float(b.ledger.run_macs()[i]) == float(a.ledger.run_macs()[0])


def test_attention_options_are_not_stgt_parameters():
    with pytest.raises(MethodError):
        build_method("stgt", sparse_attention=True)
    assert build_method("stgt", r=512).describe() == {
        "policy": "top_r", "r": 512, "threshold": 1.0, "fraction": 0.25, "prefix": "gated"}
