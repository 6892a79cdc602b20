"""``vidprune bench`` on a tiny configuration: the table, its columns and the recorded command
(no timing assertions: the numbers of a shared test machine mean nothing)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shlex

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from models import build_method, build_model
from models.benchmark import Contender, Measurement, summarise, timed_runner
from models.flops import count_dense
from models.runner import StepOutput

TINY = ["--model", "vitdet-ti", "--resolution", "112", "--option", "depth=4",
        "--option", "window=7", "--option", "global_blocks=[1,3]", "--option", "neck_channels=32",
        "--clip-model", "videomae-ti", "--clip-resolution", "112", "--clip-frames", "8",
        "--clip-option", "depth=3", "--frames", "3", "--clips", "1", "--repeats", "2",
        "--warmup", "1", "--memory-frames", "2", "--threads", "1"]
REQUIRED = ["method", "setting", "device", "streams", "gmacs_per_frame", "savings",
            "latency_ms", "speedup"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", *TINY, "--streams", "2", "--method", "eventful:r=12",
            "--method", "eventful:r=6,sparse_attention=false", "--method", "stgt:r=6",
            "--method", "rollout:k=12", "--method", "svit", "--method", "sta:r=4",
            "--out", str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 0
    return out, argv, err.getvalue()


def test_the_table_has_every_method_and_plausible_values(bench_run):
    out, argv, _ = bench_run
    table = pq.read_table(out / "bench.parquet")
    rows = table.to_pylist()
    assert set(REQUIRED) <= set(table.column_names)
    assert {"peak_mb_per_stream", "state_mb_per_stream", "gmacs_steady", "frame_speedup"} \
        <= set(table.column_names)
    assert [(r["model"], r["method"]) for r in rows] == [
        ("vitdet-ti", "dense"), ("vitdet-ti", "eventful"), ("vitdet-ti", "eventful"),
        ("vitdet-ti", "stgt"), ("vitdet-ti", "rollout"), ("vitdet-ti", "svit"),
        ("videomae-ti", "dense"), ("videomae-ti", "sta")]
    dense_gmacs = {r["model"]: r["gmacs_per_frame"] for r in rows if r["method"] == "dense"}
    # the dense row runs what the meta-device count says the model costs
    expected = count_dense("vitdet-ti", 112, options={"depth": 4, "window": 7,
                                                      "global_blocks": [1, 3]})
    assert dense_gmacs["vitdet-ti"] == pytest.approx(expected.backbone_gmacs, rel=1e-9)
    for r in rows:
        assert r["device"] == "cpu" and r["streams"] == 2 and r["threads"] == 1
        assert r["frames"] == (3 if r["model"] == "vitdet-ti" else 8) and r["repeats"] == 2
        assert r["savings"] == pytest.approx(1 - r["gmacs_per_frame"] / dense_gmacs[r["model"]])
        assert r["gmacs_reduction"] == pytest.approx(dense_gmacs[r["model"]]
                                                     / r["gmacs_per_frame"])
        assert r["latency_ms"] > 0 and r["frame_latency_ms"] >= r["latency_ms"] * 0.5
        assert r["ms_per_frame"] == pytest.approx(r["latency_ms"] / 2)
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert math.isfinite(r["peak_mb_per_stream"]) and r["peak_kind"] == "peak RSS"
        if r["method"] == "dense":
            assert r["speedup"] == 1.0 and r["savings"] == 0.0 and r["state_mb_per_stream"] == 0
        else:
            assert 0 < r["savings"] < 1 and r["token_fraction"] < 1
            # the first frame is dense: the steady state saves more than the average
            if r["method"] != "svit" and r["model"] == "vitdet-ti":
                assert r["gmacs_steady"] < r["gmacs_per_frame"]
    # fixed budgets batch without padding; svit's ragged kept sets are padded, and that
    # work, timed with the step, is shown apart from the method's own
    padding = {(r["method"], r["setting"]): r["gmacs_padding_per_frame"] for r in rows}
    assert padding.pop(("svit", "-")) > 0 and set(padding.values()) == {0.0}
    stateful = {r["method"]: r["state_mb_per_stream"] for r in rows}
    # eventful and rollout carry caches; svit only its last keep fractions
    assert stateful["eventful"] > 0.1 and stateful["rollout"] > 0.1 and stateful["svit"] < 0.001


def test_progress_is_reported_frame_by_frame(bench_run):
    lines = bench_run[2].splitlines()
    assert lines[0].startswith("vidprune bench: vitdet-ti at 112, weights random (seed 0): "
                               "dense + 5 method(s), 2 stream(s) x 3 frames x 2 repetitions")
    for rep in (1, 2):
        for frame in (1, 2, 3):
            assert any(f"vitdet-ti: repetition {rep}/2, frame {frame}/3 (" in x for x in lines)
    assert any("videomae-ti: repetition 2/2, frame 8/8 (" in x for x in lines)


def test_the_command_line_and_machine_are_recorded(bench_run):
    out, argv, _ = bench_run
    meta = json.loads(pq.read_table(out / "bench.parquet").schema.metadata[b"vidprune.bench"])
    assert meta["command"].startswith("vidprune bench --model vitdet-ti")
    assert shlex.split(meta["command"])[1:] == argv
    assert meta["threads"] == 1 and meta["dtype"] == "float32"
    text = (out / "bench.md").read_text()
    assert meta["command"] in text
    assert "| method | setting | device | streams | gmacs_per_frame | savings | latency_ms | " \
           "speedup |" in text
    assert "random gate weights" in text


def test_speedups_are_per_repetition_ratios_of_measured_times():
    """``summarise`` on hand-set times: the speedup is the median over repetitions of dense's
    mean time over the method's on the same frames (not a ratio of medians, and not GMACs)."""
    model = build_model(arch="vitdet-ti", input_size=64, depth=1, window=2, global_blocks=[0])
    dense = Measurement(Contender("dense", "-", timed_runner(model, build_method("none"))))
    pruned = Measurement(Contender("eventful", "r=4", timed_runner(
        model, build_method("eventful", r=4))))
    for m, times, gmacs in ((dense, [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0], [3.0, 3.0, 3.0]],
                             [1.0, 1.0, 1.0]),
                            (pruned, [[3.0, 1.0, 1.0], [4.0, 4.0, 4.0], [3.0, 1.5, 1.5]],
                             [1.0, 0.25, 0.25])):
        m.backbone_s = times
        m.step_s = [[t + 0.5 for t in rep] for rep in times]
        m.cpu_s = times
        m.gmacs, m.gmacs_dense = gmacs, [1.0] * 3
        m.tokens, m.tokens_dense = gmacs, [1.0] * 3
        m.outputs = [[StepOutput(), StepOutput()]]  # two streams
    rows = summarise([dense, pruned], dense)
    assert rows[0]["speedup"] == 1.0 and rows[0]["latency_ms"] == pytest.approx(3000)
    row = rows[1]
    # per repetition: 2 / (5/3), 4 / 4, 3 / 2 -> median 1.2; a ratio of the median latencies
    # (3 s / 2 s) would give 1.5
    assert row["speedup"] == pytest.approx(1.2)
    assert row["latency_ms"] == pytest.approx(2000) and row["ms_per_frame"] == 1000
    assert (row["speedup_min"], row["speedup_max"]) == pytest.approx((1.0, 1.5))
    # frames after the first: 2 / 1, 4 / 4, 3 / 1.5
    assert row["speedup_steady"] == pytest.approx(2.0)
    # the whole step: 2.5 / (13/6), 4.5 / 4.5, 3.5 / 2.5
    assert row["frame_speedup"] == pytest.approx(2.5 / (13 / 6))
    assert row["gmacs_per_frame"] == pytest.approx(0.5) and row["savings"] == pytest.approx(0.5)
    assert row["gmacs_steady"] == pytest.approx(0.25)
    assert row["backbone_ms_by_frame"] == pytest.approx([3000, 1500, 1500])


def test_help_describes_the_table_and_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("GMACs per frame, savings, latency and speedup", "bench.parquet",
                  "--model MODEL", "default vitdet-s", "--threads THREADS", "default 2",
                  "--method NAME[:K=V,...]", "--streams STREAMS", "--out OUT"):
        assert words in text


def test_malformed_numbers_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--frames", "many", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_clip_length_sta_refuses_is_reported_before_anything_is_timed(tmp_path, capsys):
    # 4 frames are 2 tubelet slices; STA groups slices in fours and says so only when a clip
    # completes, which used to come after the whole frame group had been timed
    out = tmp_path / "out"
    assert main(["bench", *TINY, "--clip-frames", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "multiple of 4 temporal slices" in err and "--method sta:" in err
    assert "repetition" not in err and "warm-up" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--method", "nonsense"], "unknown method"),
    (["--method", "eventful:r=0"], "r must be a positive"),
    (["--method", "rollout:k"], "expected NAME[:KEY=VALUE"),
    (["--frames", "0"], "--frames must be at least 1"),
    (["--resolution", "100"], "not a positive multiple"),
    (["--dtype", "float16"], "needs --device cuda"),
    (["--device", "cuda"], "no CUDA device"),
    (["--video", "/nonexistent.mp4"], "no such file"),
])
def test_user_mistakes_exit_2_without_output(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["bench", *TINY, *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
