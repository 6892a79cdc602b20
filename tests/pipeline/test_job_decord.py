"""A job with ``decode.backend: decord``, end to end through the CLI on the shared local Ray,
and the backend as a spec key."""

import json
import shutil

import pyarrow.parquet as pq
import yaml

from jobs.cli import main
from jobs.spec import validate_spec


def write_spec(path, **sections):
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_a_job_decodes_with_decord(ray_session, tiny_detector, sample_videos, tmp_path, capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    for clip in ("mma_part_0.mp4", "decord_corrupted.mp4"):
        shutil.copy(sample_videos / clip, videos / clip)
    spec = write_spec(tmp_path / "job.yaml", input={"uri": str(videos)},
                      model={**tiny_detector, "score_threshold": 0.0},
                      pruning={"method": "none"}, decode={"fps": 5},
                      output={"uri": str(out)})
    assert main(["run", spec, "--set", "decode.backend=decord"]) == 0, capsys.readouterr().err

    job = json.loads((out / "job.json").read_text())
    assert job["spec"]["decode"]["backend"] == "decord"
    assert job["fingerprint_inputs"]["decode"]["backend"] == "decord"
    rows = {v["uri"].rsplit("/", 1)[1]: v
            for v in pq.read_table(out / "videos" / "videos.parquet").to_pylist()}
    assert rows["mma_part_0.mp4"]["status"] == "ok"
    assert rows["mma_part_0.mp4"]["frames_decoded"] == 6      # 32 frames at 30 fps, 5 fps
    broken = rows["decord_corrupted.mp4"]
    assert broken["status"] == "partial" and broken["frames_decoded"] == 14   # 0, 2 ... 26
    assert broken["error"].startswith("decoding failed at frame 28: ")
    assert "decord: " in broken["error"]
    frames = pq.read_table(out / "annotations").to_pandas().groupby("uri")["frame_index"]
    got = {uri.rsplit("/", 1)[1]: sorted(set(s)) for uri, s in frames}
    assert got["mma_part_0.mp4"] == [0, 6, 12, 18, 24, 30]
    assert got["decord_corrupted.mp4"] == list(range(0, 28, 2))


def test_the_backend_is_a_spec_key(tmp_path, tiny_detector, capsys):
    base = {"input": {"uri": str(tmp_path)}, "model": tiny_detector,
            "output": {"uri": str(tmp_path / "out")}}
    assert validate_spec(base).decode.backend == "pyav"
    assert validate_spec({**base, "decode": {"backend": "decord"}}).decode.backend == "decord"
    spec = write_spec(tmp_path / "job.yaml", **base)
    assert main(["run", spec, "--set", "decode.backend=opencv"]) == 2
    err = capsys.readouterr().err
    assert "decode.backend:" in err and "'pyav' or 'decord'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
