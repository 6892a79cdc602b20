"""``vidprune train-gates`` on real videos: a checkpoint and a zoo card that the registry
loads and the svit method runs; user mistakes exit 2 with nothing written."""

import json
import shutil

import pytest

from jobs.cli import main

TINY = ["--model", "videomae-s", "--option", "depth=4", "--option", "dim=32",
        "--option", "heads=2", "--option", "input_size=64", "--option", "clip_frames=8",
        "--option", "num_classes=3"]


@pytest.fixture
def videos(tmp_path, sample_videos):
    """A short real clip, and a broken one the command must skip past."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("mma_part_0.mp4", "decord_corrupted.mp4"):
        shutil.copy(sample_videos / name, folder / name)
    return folder


def test_trains_and_ships_a_zoo_entry(videos, tmp_path, monkeypatch, capsys):
    import torch

    import models.registry as registry
    from models import StreamRunner, build_method, build_model

    out = tmp_path / "zoo" / "tiny-svit.safetensors"
    out.parent.mkdir()
    rc = main(["train-gates", *TINY, "--data", str(videos), "--out", str(out), "--steps", "3",
               "--batch", "1", "--keep-ratios", "0.8,0.6,0.4"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "step 3/3" in err and "wrote" in err
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["arch"] == "videomae-s"
    assert card["options"]["svit"] == {"dense_blocks": 1, "keep_ratios": [0.8, 0.6, 0.4]}
    assert card["svit_training"]["steps"] == 3 and card["svit_training"]["seed"] == 0

    monkeypatch.setattr(registry, "ZOO_DIR", out.parent)
    model = build_model("tiny-svit")
    assert model.backbone.svit_gates.keep_ratios == [0.8, 0.6, 0.4]
    runner = StreamRunner(model, build_method("svit"))
    state = runner.new_state(1)
    frame = torch.randint(0, 255, (90, 120, 3), dtype=torch.uint8)
    outs = [runner.step([frame], state)[0] for _ in range(8)]
    assert len(outs[-1].clips) == 1 and outs[-1].gmacs_overhead > 0


def test_gates_go_on_training_from_a_zoo_folder(videos, tmp_path, capsys):
    """--zoo-dir reads --model from a folder that train-gates wrote: the model keeps its
    trained gates and weights (bit for bit, with nothing learning), and the new card keeps
    the base model and the earlier run's training."""
    import torch
    from safetensors.torch import load_file

    first = tmp_path / "zoo" / "first.safetensors"
    first.parent.mkdir()
    assert main(["train-gates", *TINY, "--data", str(videos), "--out", str(first),
                 "--steps", "2", "--batch", "1", "--keep-ratios", "0.8,0.6,0.4"]) == 0
    second = tmp_path / "second.safetensors"
    assert main(["train-gates", "--zoo-dir", str(first.parent), "--model", "first",
                 "--data", str(videos), "--out", str(second), "--steps", "1", "--batch", "1",
                 "--lr", "0"]) == 0
    card = json.loads(second.with_suffix(".json").read_text())
    assert card["base_model"] == "videomae-s" and card["description"].startswith("videomae-s ")
    assert card["options"]["svit"]["keep_ratios"] == [0.8, 0.6, 0.4]
    earlier = card["svit_training"]["continued_from"]
    assert earlier["model"] == "first" and earlier["svit_training"]["steps"] == 2
    before, after = load_file(str(first)), load_file(str(second))
    gates = [k for k in before if "svit_gates" in k]
    assert gates and all(torch.equal(before[k], after[k]) for k in before)  # lr 0: unchanged

    for argv, message in (
            (["--zoo-dir", str(tmp_path / "nope")], "not a folder"),
            (["--zoo-dir", str(first.parent), "--option", "depth=2"], "takes no --checkpoint"),
            (["--zoo-dir", str(tmp_path)], "unknown zoo model 'first'")):
        capsys.readouterr()
        assert main(["train-gates", "--model", "first", *argv, "--data", str(videos),
                     "--out", str(tmp_path / "bad.safetensors"), "--steps", "1"]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))


@pytest.mark.parametrize("change, message", [
    (["--data", "missing-folder"], "not a folder"),
    (["--out", "{tmp}/weights.pth"], "must end in .safetensors"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--model", "no-such-model"], "unknown model"),
    (["--keep-ratios", "0.5"], "keep_ratios needs 3 values"),
    (["--settle", "1.5"], "--settle must be in [0, 1]"),
])
def test_user_mistakes_exit_2_and_write_nothing(change, message, videos, tmp_path, capsys):
    args = ["train-gates", *TINY, "--data", str(videos),
            "--out", str(tmp_path / "out.safetensors"), "--steps", "1"]
    for i in range(0, len(change), 2):
        flag, value = change[i], change[i + 1].format(tmp=tmp_path)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob("weights*"))


def test_undecodable_videos_are_dropped(videos, tmp_path, capsys):
    import torch

    from jobs.commands.train_gates import VideoClips
    from jobs.errors import UserError

    def crop(frame):
        return torch.as_tensor(frame)[:8, :8].permute(2, 0, 1).float()

    paths = sorted(videos.iterdir())
    clips = VideoClips(paths, frames=8, stride=4, preprocess=crop, seed=0)
    samples = [clips.sample() for _ in range(4)]
    assert all(s.shape == (3, 8, 8, 8) for s in samples)
    assert [p.name for p, _ in clips.readers] == ["mma_part_0.mp4"]
    assert "dropping decord_corrupted.mp4" in capsys.readouterr().err
    broken = VideoClips([videos / "decord_corrupted.mp4"], 8, 4, crop, seed=0)
    with pytest.raises(UserError, match="could be decoded"):
        broken.sample()
    # through the command: exit 2, nothing written
    (videos / "mma_part_0.mp4").unlink()
    out = tmp_path / "out.safetensors"
    assert main(["train-gates", *TINY, "--data", str(videos), "--out", str(out),
                 "--steps", "1"]) == 2
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("task", ["detection", "recognition"])
def test_labels_train_on_a_generated_task_folder(task, tmp_path, capsys):
    """--labels reads the labelled train split of `vidprune generate` and trains on the
    model's own task loss; data of the other task or other classes exit 2."""
    data = tmp_path / "data"
    sizes = ["--train", "2", "--val", "0", "--test", "0"] if task == "detection" else \
        ["--train", "4", "--val", "0", "--test", "0"]
    assert main(["generate", "--out", str(data), "--task", task, "--frames", "3", "--quiet",
                 *sizes]) == 0
    model = (["--model", "vitdet-ti", "--option", "input_size=64", "--option", "window=2",
              "--option", "depth=4", "--option", "dim=32", "--option", "heads=2",
              "--option", "neck_channels=16", "--option", "num_classes=5"]
             if task == "detection" else
             ["--model", "videomae-ti", "--option", "input_size=32", "--option", "depth=2",
              "--option", "dim=32", "--option", "heads=2", "--option", "num_classes=9"])
    out = tmp_path / "gated.safetensors"
    capsys.readouterr()
    assert main(["train-gates", *model, "--data", str(data / task), "--labels", "--out",
                 str(out), "--steps", "2", "--batch", "2", "--backbone-lr", "1e-4",
                 "--settle", "0.5", "--schedule", "cosine"]) == 0
    err = capsys.readouterr().err
    assert "labelled training items" in err and "step 2/2" in err and " task " in err
    assert "noise 0.00" in err  # settled: the last step draws the inference decisions
    card = json.loads(out.with_suffix(".json").read_text())["svit_training"]
    assert card["labels"] is True and card["frame_stride"] is None
    assert card["loss"].startswith("task loss on labels (" +
                                   ("CenterNet" if task == "detection" else "cross-entropy"))
    assert card["steps"] == 2 and card["backbone_lr"] == 1e-4 and card["settle"] == 0.5
    assert card["schedule"] == "cosine"

    other = "recognition" if task == "detection" else "detection"
    bad = tmp_path / "bad.safetensors"
    assert main(["train-gates", *model, "--data", str(data), "--labels", "--out", str(bad),
                 "--steps", "1"]) == 2  # the generate root, not a task folder
    assert "--labels" in capsys.readouterr().err
    wrong = [*model[:-1], "num_classes=3"]
    assert main(["train-gates", *wrong, "--data", str(data / task), "--labels", "--out",
                 str(bad), "--steps", "1"]) == 2
    assert "classes" in capsys.readouterr().err
    assert main(["generate", "--out", str(data), "--task", other, "--frames", "3", "--quiet",
                 "--train", "1", "--val", "0", "--test", "0"]) == 0
    assert main(["train-gates", *model, "--data", str(data / other), "--labels", "--out",
                 str(bad), "--steps", "1"]) == 2
    assert f"holds {other} data" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))


def test_svit_keep_script_reports_what_the_gates_keep(tmp_path):
    """scripts/svit_keep.py (the source of docs/RESULTS.md's keep fractions) on gates
    trained by the command: one figure per gated block, each a fraction."""
    import subprocess
    import sys
    from pathlib import Path

    data, zoo = tmp_path / "data", tmp_path / "zoo"
    zoo.mkdir()
    assert main(["generate", "--out", str(data), "--task", "recognition", "--quiet",
                 "--train", "2", "--val", "2", "--test", "0"]) == 0
    assert main(["train-gates", "--model", "videomae-ti", "--option", "input_size=32",
                 "--option", "depth=3", "--option", "dim=32", "--option", "heads=2",
                 "--option", "num_classes=9", "--data", str(data / "recognition"), "--labels",
                 "--out", str(zoo / "tiny-svit.safetensors"), "--steps", "1",
                 "--dense-blocks", "1", "--keep-ratios", "0.6,0.4"]) == 0
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "scripts" / "svit_keep.py"), "--zoo-dir",
                          str(zoo), "--model", "tiny-svit", "--data", str(data), "--limit", "2"],
                         capture_output=True, text=True, check=True).stdout
    lines = dict(line.split("  ", 1) for line in out.splitlines()[1:])
    assert out.startswith("tiny-svit on 2 val clips")
    assert [float(v) for v in lines["keep target"].split()] == [0.6, 0.4]
    for key in ("kept at inference", "keep probability", "median |margin|"):
        values = [float(v) for v in lines[key].split()]
        assert len(values) == 2 and all(0.0 <= v for v in values), (key, values)
    assert all(v <= 1.0 for v in map(float, lines["kept at inference"].split()))
