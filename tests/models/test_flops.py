"""``vidprune flops`` reproduces the published dense baselines (one MAC counted as one FLOP)."""

from __future__ import annotations

import json
import re

import pytest

from jobs.cli import main


def flops(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["flops", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def row(text: str, name: str) -> list[float]:
    """The numbers of a row of the printed table (per unit, then per frame for clips)."""
    line = next(l for l in text.splitlines() if l.startswith(name))
    return [float(v) for v in re.findall(r"\d+\.\d+", line[:44])]


@pytest.mark.parametrize("resolution, published", [("1024", 467.4), ("672", 174.5)])
def test_vitdet_b_backbone(capsys, resolution, published):
    code, out, _ = flops(capsys, "--model", "vitdet-b", "--resolution", resolution)
    assert code == 0
    assert "One multiply-accumulate (MAC) is counted as one FLOP" in out
    assert row(out, "backbone")[0] == pytest.approx(published, rel=0.01)
    assert row(out, "full model")[0] > row(out, "backbone")[0]


def test_videomae_b_clip_full_model(capsys):
    code, out, _ = flops(capsys, "--model", "videomae-b", "--resolution", "224", "--frames", "16")
    assert code == 0
    per_clip, per_frame = row(out, "full model")
    assert per_clip == pytest.approx(180, rel=0.01)
    assert per_frame == pytest.approx(per_clip / 16, abs=0.01)
    assert "GMACs/clip" in out and "GMACs/frame" in out


def test_vit_b16_full_model(capsys):
    code, out, _ = flops(capsys, "--model", "vit-b", "--resolution", "224")
    assert code == 0
    assert row(out, "full model")[0] == pytest.approx(17.6, rel=0.01)


def test_rcnn_head_is_counted_to_its_raw_outputs(capsys):
    code, out, _ = flops(capsys, "--model", "vitdet-b-rcnn", "--resolution", "1024", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["mac_is_flop"] and report["unit"] == "frame"
    assert report["backbone_gmacs"] == pytest.approx(467.4, rel=0.01)
    # RPN on p2-p6 and the box head on 1000 proposals: the head costs hundreds of GMACs
    assert "1000 proposals" in report["head_counts"]
    assert 250 < report["gmacs_by_part"]["head"] < 350


def test_architecture_options(capsys):
    """The published ViViT-B embeds 2-frame tubelets: half the spatial steps of a clip."""
    _, frames, _ = flops(capsys, "--model", "vivit-b", "--frames", "32", "--json")
    _, tubelets, _ = flops(capsys, "--model", "vivit-b", "--frames", "32", "--option", "tubelet=2",
                           "--json")
    assert json.loads(tubelets)["backbone_gmacs"] < 0.51 * json.loads(frames)["backbone_gmacs"]
    # 16 steps of a 2x16x16 tubelet convolution (and bias) per token, plus the position add
    embed_step = 196 * 768 * (2 * 3 * 16 * 16 + 1) + 197 * 768
    assert json.loads(tubelets)["gmacs_by_part"]["patch_embed"] == pytest.approx(
        16 * embed_step / 1e9, rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--model", "vitdet-b", "--resolution", "1000"], "multiple of the patch size"),
    (["--model", "vitdet-b", "--frames", "8"], "--frames applies to clip models"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "videomae-b", "--frames", "0"], "--frames must be positive"),
    (["--model", "vitdet-b", "--option", "colour=red"], "unknown options for vitdet-b: colour"),
    (["--model", "vitdet-b", "--option", "tubelet"], "expected KEY=VALUE"),
    (["--model", "vitdet-ti", "--option", "depth=abc"], "depth must be a positive integer"),
    (["--model", "vitdet-ti", "--option", "window=abc"], "window must be a positive integer"),
    (["--model", "vitdet-ti", "--option", "neck_scales=2"], "neck_scales must be a list"),
])
def test_user_mistakes_exit_2_with_a_message(capsys, args, message):
    code, out, err = flops(capsys, *args)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
