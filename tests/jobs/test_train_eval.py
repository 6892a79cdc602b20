"""`vidprune generate`, `train` and `eval` end to end on a tiny setting."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.commands.eval import RESULT_COLUMNS, parse_grid

TINY = {
    "detection": ["--option", "input_size=64", "--option", "window=2", "--option", "depth=4",
                  "--option", "dim=32", "--option", "heads=2", "--option", "neck_channels=16"],
    "recognition": ["--option", "input_size=32", "--option", "depth=2", "--option", "dim=32",
                    "--option", "heads=2"],
}


@pytest.mark.parametrize("task", ["detection", "recognition"])
def test_generate_train_resume_eval(tmp_path, task, capsys):
    data, zoo = tmp_path / "data", tmp_path / "zoo"
    sizes = ["--train", "2", "--val", "1", "--test", "2"] if task == "detection" else \
        ["--train", "9", "--val", "2", "--test", "2"]
    assert main(["generate", "--out", str(data), "--task", task, "--frames", "5", "--quiet",
                 *sizes]) == 0
    train = ["train", "--task", task, "--data", str(data), "--run-dir", str(tmp_path / "run"),
             "--zoo-dir", str(zoo), "--steps", "3", "--batch", "2", "--log-every", "1",
             "--warmup", "1", *TINY[task]]
    assert main(train) == 0
    name = "vitdet-synth" if task == "detection" else "videomae-synth"
    card = json.loads((zoo / f"{name}.json").read_text())
    assert (zoo / f"{name}.safetensors").is_file()
    assert card["model_card"]["data"]["seed"] == 0
    assert card["model_card"]["training"]["steps"] == 3
    metric = "map50" if task == "detection" else "top1"
    assert set(card["model_card"]["metrics"]) == {"val", "test"}
    assert 0.0 <= card["model_card"]["metrics"]["test"][metric] <= 1.0
    log = (tmp_path / "run" / "loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]

    # the same command again resumes from the checkpoint: nothing left to train
    capsys.readouterr()
    assert main([*train, "--no-eval"]) == 0
    assert "resuming at step 3/3" in capsys.readouterr().err
    assert len((tmp_path / "run" / "loss.jsonl").read_text().splitlines()) == 3

    out = tmp_path / "eval"
    assert main(["eval", "--task", task, "--data", str(data), "--zoo-dir", str(zoo),
                 "--out", str(out), "--methods", "none", "--streams", "2"]) == 0
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert list(table[0]) == list(RESULT_COLUMNS)
    (row,) = table
    assert row["method"] == "none" and row["metric"] == metric and row["task"] == task
    # dense against itself (an untrained tiny detector may find nothing: NaN then)
    assert row["agreement"] == 1.0 or (task == "detection" and math.isnan(row["agreement"]))
    assert row["savings"] == pytest.approx(0.0)
    assert row["gmacs_per_frame"] > 0 and row["videos"] == 2
    assert row["gmacs_padding_per_frame"] == 0.0  # nothing ragged to pad
    assert row["frames"] == (10 if task == "detection" else 32)
    assert "| none | dense |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_gmacs.png").read_bytes()[:4] == b"\x89PNG"
    if task != "detection":
        return

    # operating points: chosen on val (test results are refused), written into the card
    assert main(["choose", str(out / "results.parquet"), "--zoo-dir", str(zoo)]) == 2
    assert "validation split" in capsys.readouterr().err
    val = tmp_path / "eval-val"
    assert main(["eval", "--task", task, "--data", str(data), "--zoo-dir", str(zoo),
                 "--split", "val", "--out", str(val), "--methods", "eventful",
                 "--grid", "eventful:r=4,8", "--streams", "2"]) == 0
    rows = pq.read_table(val / "results.parquet").to_pylist()
    before = json.loads((zoo / f"{name}.json").read_text())
    assert main(["choose", str(val / "results.parquet"), "--zoo-dir", str(zoo),
                 "--tolerance", "100", "--write"]) == 0
    section = json.loads((zoo / f"{name}.json").read_text())["pruning"]
    most = max((r for r in rows if r["method"] == "eventful"), key=lambda r: r["savings"])
    assert section["default_method"] == "eventful"
    assert section["operating_points"] == {"eventful": {"r": int(most["setting"][2:])}}
    assert section["chosen_on"]["split"] == "val"
    after = json.loads((zoo / f"{name}.json").read_text())
    assert {k: v for k, v in after.items() if k != "pruning"} == before  # nothing else changed


def test_user_mistakes_exit_2(tmp_path, capsys):
    assert main(["eval", "--task", "detection", "--data", str(tmp_path), "--out",
                 str(tmp_path / "e")]) == 2
    assert "vidprune generate" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    assert main(["train", "--task", "recognition", "--data", str(tmp_path), "--run-dir",
                 str(tmp_path / "r")]) == 2
    assert main(["generate", "--out", str(tmp_path / "g"), "--train", "-1"]) == 2
    assert main(["eval", "--task", "detection", "--out", str(tmp_path / "e"),
                 "--grid", "eventful"]) == 2


def test_parse_grid():
    assert parse_grid(["eventful:r=32,64", "rollout:k=8:refresh=4,8"]) == {
        "eventful": [{"r": 32}, {"r": 64}],
        "rollout": [{"k": 8, "refresh": 4}, {"k": 8, "refresh": 8}]}
