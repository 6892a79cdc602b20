"""Untrusted input never runs code or reaches past what it names: job specs (YAML tags,
dotted names), checkpoints (pickles, through the job's own path, local and S3), video files
that are playlists or concat lists, S3 endpoints (HTTPS unless plain HTTP is asked for);
and no code path calls the functions that would allow it."""

import ast
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from jobs.cli import main
from jobs.spec import load_spec
from operators.decode import VideoError, probe_target
from pipeline.storage import Location, filesystem
from tests.badinput import video

REPO = Path(__file__).resolve().parents[2]


class CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_spec_cannot_construct_python_objects(tmp_path, tiny_detector, sample_videos,
                                                capsys):
    marker = tmp_path / "ran"
    spec = tmp_path / "job.yaml"
    base = {"input": {"uri": str(sample_videos)}, "model": tiny_detector,
            "pruning": {"method": "none"}, "output": {"uri": str(tmp_path / "out")}}
    spec.write_text(yaml.safe_dump(base) + f'name: !!python/object/apply:os.system '
                                          f'["touch {marker}"]\n')
    assert main(["run", str(spec), "--dry-run"]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    spec.write_text(yaml.safe_dump(base))
    assert main(["run", str(spec), "--dry-run", "--set",
                 f'name=!!python/object/apply:os.system ["touch {marker}"]']) == 2
    assert "not valid YAML" in capsys.readouterr().err
    # Models and methods are registry names, never import paths.
    for override, key in (("model.arch=os.system", "model.arch"),
                          ("pruning.method=builtins.eval", "pruning.method"),
                          ("model.options={__class__: x}", None)):
        code = main(["run", str(spec), "--dry-run", "--set", override])
        assert code == 2, override
        err = capsys.readouterr().err
        assert key is None or key in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_malicious_checkpoint_is_refused_on_the_job_path(tmp_path, tiny_detector,
                                                           sample_videos, s3, capsys):
    marker = tmp_path / "ran"
    from safetensors.torch import load_file

    state = load_file(tiny_detector["checkpoint"])
    evil = tmp_path / "evil.pth"
    torch.save({"model": {**state, "x": CreatesMarker(marker)}}, evil)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": CreatesMarker(marker)}))
    store = Location.open("s3://models", endpoint_url=s3.endpoint_url).fs
    store.mkdir("models")
    store.put(str(evil), "models/evil.pth")
    spec = tmp_path / "job.yaml"
    for checkpoint in (str(evil), str(tmp_path / "evil.pkl"), "s3://models/evil.pth"):
        spec.write_text(yaml.safe_dump({
            "input": {"uri": str(sample_videos), "storage": {"endpoint_url": s3.endpoint_url}},
            "model": {**tiny_detector, "checkpoint": checkpoint},
            "pruning": {"method": "none"}, "output": {"uri": str(tmp_path / "out")}}))
        assert main(["run", str(spec)]) == 2, checkpoint
        err = capsys.readouterr().err
        assert "model.checkpoint" in err and "refused" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["hls", "concat"])
def test_a_playlist_cannot_make_the_decoder_open_what_it_names(tmp_path, kind):
    real = video(tmp_path / "real.mp4", 5)
    if kind == "hls":
        path = tmp_path / "list.m3u8"
        path.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{real}\n"
                        "#EXT-X-ENDLIST\n")
    else:
        path = tmp_path / "list.ffconcat"
        path.write_text(f"ffconcat version 1.0\nfile '{real}'\n")
    with pytest.raises(VideoError, match="not a container videos come in"):
        probe_target(str(path))
    assert probe_target(str(real))["frames_total"] == 5  # the file itself opens


def test_s3_endpoints_are_https_unless_plain_http_is_asked_for(tmp_path):
    base = {"input": {"uri": "s3://bucket/videos", "storage": {}},
            "model": {"arch": "vitdet-ti", "checkpoint": "/w.safetensors"},
            "pruning": {"method": "none"}, "output": {"uri": str(tmp_path / "out")}}
    base["input"]["storage"]["endpoint_url"] = "minio.example.com:9000"
    spec, notes = load_spec(None, base=base)
    assert spec.input.storage.endpoint_url == "https://minio.example.com:9000"
    assert spec.output.storage.endpoint_url == "https://minio.example.com:9000" and not notes
    fs, _ = filesystem(spec.input.uri, **spec.input.storage.options())
    assert fs.client_kwargs["endpoint_url"] == "https://minio.example.com:9000"
    base["input"]["storage"]["endpoint_url"] = "http://minio.example.com:9000"
    spec, notes = load_spec(None, base=base)
    assert spec.input.storage.endpoint_url == "http://minio.example.com:9000"
    assert len(notes) == 1 and "plain HTTP" in notes[0]
    base["input"]["storage"]["endpoint_url"] = "http://127.0.0.1:9000"
    assert load_spec(None, base=base)[1] == []  # loopback: no note


# -- no code path that could run what it reads ------------------------------------------------

_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
_FORBIDDEN_ATTRS = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                    ("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"),
                    ("os", "system"), ("os", "popen")}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if isinstance(f, ast.Name) and f.id in _FORBIDDEN_CALLS:
            found.append(f"{where} {f.id}()")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                and (f.value.id, f.attr) in _FORBIDDEN_ATTRS:
            found.append(f"{where} {f.value.id}.{f.attr}()")
        if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                and f.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                       and k.value.value is True for k in node.keywords)
            if not safe:
                found.append(f"{where} torch.load() without weights_only=True")
        if any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value
               for k in node.keywords):
            found.append(f"{where} shell=True")
    return found


def test_no_code_path_evaluates_or_unpickles_what_it_reads():
    files = [p for package in ("jobs", "pipeline", "operators", "models")
             for p in (REPO / package).rglob("*.py")]
    assert len(files) > 30
    found = [v for p in files for v in _violations(p)]
    assert found == [], found
    # The one unpickler is models.checkpoints' restricted one (numpy globals only).
    source = (REPO / "models" / "checkpoints.py").read_text()
    assert "class _NumpyOnlyUnpickler(pickle.Unpickler)" in source
