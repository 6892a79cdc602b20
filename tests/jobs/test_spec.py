"""The job spec: every problem reported by key path, overrides, defaults, and the CLI
refusing a bad spec with exit code 2 before writing anything."""

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from jobs.cli import main
from jobs.errors import UserError
from jobs.spec import DEFAULT_METHODS, DEFAULT_MODELS, SpecError, load_spec, validate_spec
from models.methods import METHODS
from models.methods.base import Dense, Method


class Gates(Method):
    """A registered method with typed parameters (the real eventful, sta ... plug in the
    same way)."""

    name = "gates"
    kinds = frozenset({"frame"})

    @dataclass
    class Params:
        policy: Literal["top_r", "threshold"] = "top_r"
        r: int = 256
        threshold: float = 0.1

        def __post_init__(self):
            if self.r < 1:
                raise ValueError("r must be at least 1")

    forward = Dense.forward


class ClipOnly(Gates):
    name = "cliponly"
    kinds = frozenset({"clip"})


@pytest.fixture(autouse=True)
def methods(monkeypatch):
    monkeypatch.setitem(METHODS, "gates", Gates)
    monkeypatch.setitem(METHODS, "cliponly", ClipOnly)


@pytest.fixture
def base(tiny_detector, tmp_path):
    return {"input": {"uri": str(tmp_path / "videos")}, "output": {"uri": str(tmp_path / "out")},
            "model": dict(tiny_detector), "pruning": {"method": "gates"}}


def problems(data, overrides=None) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        load_spec(None, overrides, base=data)
    return dict(info.value.problems)


def test_defaults(base):
    spec, notes = load_spec(None, base=base)
    assert notes == []
    assert spec.name == "videos" and spec.model.task == "detection"
    assert spec.pruning.method == "gates"
    assert spec.pruning.params == {"policy": "top_r", "r": 256, "threshold": 0.1}
    assert spec.decode.segment_frames == 2048 and spec.decode.fps is None
    assert (spec.resources.actors, spec.resources.gpus_per_actor, spec.resources.cpus_per_actor,
            spec.resources.streams_per_actor) == (1, 0, 1, 1)
    assert spec.output.mode == "resume" and spec.model.score_threshold == 0.3
    assert spec.output.storage == spec.input.storage
    assert "*.mp4" in spec.input.patterns and "*.mkv" in spec.input.patterns
    again = validate_spec(spec.as_dict())  # job.json holds a spec that validates again
    assert again == spec
    assert spec.as_dict()["pruning"] == {"method": "gates", "policy": "top_r", "r": 256,
                                         "threshold": 0.1}


def test_every_problem_is_listed_by_key_path(base):
    base["input"]["uri"] = "ftp://host/videos"
    base["input"]["pattern"] = "*.mp4"
    base["resources"] = {"actors": 0, "gpus_per_actor": -1, "memory": "8G"}
    base["decode"] = {"fps": 0, "segment_frames": "many"}
    base["output"]["mode"] = "append"
    base["colour"] = "blue"
    got = problems(base)
    assert set(got) == {"input.uri", "input.pattern", "resources.actors",
                        "resources.gpus_per_actor", "resources.memory", "decode.fps",
                        "decode.segment_frames", "output.mode", "colour"}
    assert got["input.pattern"] == "unknown key" and got["colour"] == "unknown key"
    assert "unsupported scheme 'ftp'" in got["input.uri"]
    assert "'resume', 'overwrite' or 'error'" in got["output.mode"]


def test_required_sections(tiny_detector):
    got = problems({"input": {}, "model": tiny_detector, "pruning": {"method": "none"}})
    assert got == {"input.uri": "required", "output": "required"}
    with pytest.raises(SpecError, match="a mapping of sections"):
        validate_spec(["input"])


def test_unknown_models_list_what_is_available(base):
    base["model"] = {"name": "no-such-model"}
    got = problems(base)["model.name"]
    assert "unknown zoo model 'no-such-model'" in got and "vitdet-b" in got
    base["model"] = {"arch": "vitdet-xxl", "checkpoint": "/w.safetensors"}
    assert "available: videomae-b" in problems(base)["model.arch"]
    base["model"] = {"arch": "vit-b", "checkpoint": "/w.safetensors"}
    assert "classification architecture" in problems(base)["model.arch"]
    base["model"] = {"arch": "vitdet-b"}
    assert "needs a checkpoint" in problems(base)["model.checkpoint"]
    base["model"] = {"arch": "videomae-s", "checkpoint": "/w.pth", "task": "detection"}
    assert "recognition model" in problems(base)["model.task"]
    base["model"] = {"options": {"depth": 2}}
    assert "goes with arch" in problems(base)["model.options"]


def test_default_model_and_method_come_from_the_task(base, monkeypatch):
    import models
    from models.registry import ZooEntry

    default = DEFAULT_MODELS["recognition"]
    base["model"] = {"task": "recognition"}
    del base["pruning"]
    monkeypatch.setattr(models, "zoo_entries", lambda: {})
    got = problems(base)["model.name"]
    assert got.startswith(f"unknown zoo model '{default}'; installed: (none)")

    entry = ZooEntry(default, "videomae-ti", {}, ["a", "b"], "weights.safetensors", {})
    monkeypatch.setattr(models, "zoo_entries", lambda: {default: entry})
    monkeypatch.setitem(METHODS, DEFAULT_METHODS["recognition"], ClipOnly)
    spec, _ = load_spec(None, base=base)
    assert (spec.model.name, spec.model.task) == (default, "recognition")
    assert spec.pruning.method == DEFAULT_METHODS["recognition"]

    base["model"] = {"arch": "vitdet-ti", "checkpoint": "/w.safetensors"}
    monkeypatch.delitem(METHODS, DEFAULT_METHODS["detection"], raising=False)
    got = problems(base)
    assert got["pruning.method"].startswith(
        f"unknown pruning method '{DEFAULT_METHODS['detection']}' (the default for detection)")
    monkeypatch.setitem(METHODS, DEFAULT_METHODS["detection"], Gates)
    spec, _ = load_spec(None, base=base)
    assert spec.pruning.method == DEFAULT_METHODS["detection"]


def test_method_parameters_are_checked_against_the_method(base):
    base["pruning"] = {"method": "gates", "r": "many", "policy": "random", "window": 3}
    got = problems(base)
    assert set(got) == {"pruning.r", "pruning.policy", "pruning.window"}
    assert "valid integer" in got["pruning.r"]
    assert "'top_r' or 'threshold'" in got["pruning.policy"]
    assert got["pruning.window"] == ("unknown parameter of method 'gates'; its parameters: "
                                     "policy, r, threshold")
    base["pruning"] = {"method": "gates", "r": 0}  # the method's own check, at its key
    assert "r must be at least 1" in problems(base)["pruning.r"]
    base["pruning"] = {"method": "magic"}
    assert f"available: {', '.join(sorted(METHODS))}" in problems(base)["pruning.method"]
    base["pruning"] = {"method": "none", "r": 4}
    assert "pruning.r" in problems(base)


def test_set_overrides(base):
    spec, notes = load_spec(None, ["resources.actors=4", "decode.fps=2.5",
                                   "input.patterns=[a*.mp4, '*.MKV']", "pruning.r=64",
                                   "name=nightly", "model.labels=null", "decode.clip_frames=8"],
                            base=base)
    assert spec.resources.actors == 4 and spec.decode.fps == 2.5 and spec.name == "nightly"
    assert spec.input.patterns == ["a*.mp4", "*.MKV"] and spec.pruning.params["r"] == 64
    assert spec.decode.clip_frames == 8

    base["pruning"] = {"method": "gates", "r": 64, "policy": "threshold"}
    spec, notes = load_spec(None, ["pruning.method=none"], base=base)
    assert spec.pruning.method == "none" and spec.pruning.params == {}
    assert notes == ["pruning.method=none: dropped parameters of the previous method: policy, r"]

    assert set(problems(base, ["resources.actors=lots", "output.mode=sideways"])) == {
        "resources.actors", "output.mode"}
    for bad in ("resources.actors", "=4", "a..b=1", "x=[1, 2"):
        with pytest.raises(UserError, match="--set"):
            load_spec(None, [bad], base=base)
    with pytest.raises(UserError, match=r"""in quotes, e.g. --set 'input.patterns="\*.mp4"'"""):
        load_spec(None, ["input.patterns=*.mp4"], base=base)  # YAML reads * as an alias


def test_credentials_never_go_in_the_spec(base):
    base["input"]["storage"] = {"aws_secret_access_key": "hunter2", "endpoint_url": None}
    got = problems(base)["input.storage"]
    assert "set them in the environment" in got and "hunter2" not in got
    base["input"]["storage"] = {"endpoint_url": "https://me:hunter2@minio.local"}
    assert "credentials come from the environment" in problems(base)["input.storage.endpoint_url"]
    base["input"]["storage"] = {"endpoint_url": "https://minio.local?X-Amz-Credential=abc"}
    assert "https://" in problems(base)["input.storage.endpoint_url"]
    base["input"] = {"uri": "s3://bucket/videos?X-Amz-Signature=abc"}
    assert "no query strings" in problems(base)["input.uri"]


def test_names():
    for uri, name in (("s3://bucket/videos/", "videos"), ("/data/My Archive", "My-Archive"),
                      ("s3://bucket", "bucket")):
        spec = {"input": {"uri": uri}, "output": {"uri": "/tmp/x"},
                "model": {"arch": "vitdet-ti", "checkpoint": "/w.safetensors"},
                "pruning": {"method": "none"}}
        assert validate_spec(spec).name == name
    spec["name"] = "../../etc"
    assert "letters, digits" in problems(spec)["name"]


# -- through the CLI --------------------------------------------------------------------------

def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_refuses_a_bad_spec_with_exit_code_2_and_writes_nothing(base, tmp_path, capsys):
    base["resources"] = {"actors": -1}
    base["pruning"] = {"method": "gates", "r": "x"}
    code = main(["run", write(tmp_path / "job.yaml", base)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "invalid job spec" in err and "(2 problems)" in err
    assert "resources.actors:" in err and "pruning.r:" in err
    assert not (tmp_path / "out").exists()

    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the job spec" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("input: {uri: [\n")
    assert main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_cli_lists_every_kind_of_misfit_of_a_checkpoint(base, tmp_path, capsys):
    """Many missing keys never push the unexpected and mis-shaped ones out of the message."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(base["model"]["checkpoint"])
    names = sorted(state)
    misfit = {k: v for k, v in state.items() if k not in names[:40]}
    for name in sorted(misfit)[:7]:
        misfit[name] = misfit[name].new_zeros(*misfit[name].shape, 2)
    misfit.update({f"extra.blocks.{i}.weight": torch.zeros(2) for i in range(8)})
    folder = tmp_path / ("a-folder-with-a-rather-long-name-" * 3)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in misfit.items()}, folder / "misfit.safetensors")
    job = write(tmp_path / "job.yaml", base)
    code = main(["run", job, "--dry-run", "--set",
                 f"model.checkpoint={folder / 'misfit.safetensors'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "does not fit vitdet-ti: missing keys (40): " in err
    assert "(+34 more); unexpected keys (8): extra.blocks.0.weight, " in err
    assert "extra.blocks.5.weight (+2 more); wrong shape keys (7): " in err
    assert err.rstrip().endswith("(+1 more)")


def test_cli_says_a_junk_checkpoint_is_unreadable_not_unsafe(base, tmp_path, capsys):
    junk = tmp_path / "bad.pth"
    junk.write_bytes(b"garbage\n")  # echo garbage > bad.pth
    job = write(tmp_path / "job.yaml", base)
    assert main(["run", job, "--dry-run", "--set", f"model.checkpoint={junk}"]) == 2
    err = capsys.readouterr().err
    assert f"model.checkpoint: {junk}: not a readable checkpoint (neither a torch archive" in err
    assert "refused" not in err and "Traceback" not in err


def test_cli_refuses_what_the_driver_finds_before_writing(base, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"x")
    job = write(tmp_path / "job.yaml", base)

    # A method that cannot run on the model (found by building the model on the driver).
    assert main(["run", job, "--set", "pruning.method=cliponly"]) == 2
    assert "pruning: method 'cliponly' runs on clip models" in capsys.readouterr().err
    # A checkpoint that is not there, or does not fit the architecture.
    assert main(["run", job, "--set", f"model.checkpoint={tmp_path}/nope.safetensors"]) == 2
    assert "model.checkpoint:" in capsys.readouterr().err
    assert main(["run", job, "--set", "model.options.depth=3"]) == 2
    assert "does not fit vitdet-ti" in capsys.readouterr().err
    assert main(["run", job, "--set", "model.options.wings=2"]) == 2
    assert "unknown options for vitdet-ti: wings" in capsys.readouterr().err
    # An input that does not exist.
    assert main(["run", job, "--set", f"input.uri={tmp_path}/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "input.uri:" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()
