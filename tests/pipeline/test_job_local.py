"""The main job end to end on a local folder, through the CLI, on the shared local Ray:
the sample clips (the corrupted one among them), a video split into many segments, and
every output mode."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from models import zoo_entries
from operators.decode import sampled_indices, sampling_ratio
from pipeline.schemas import DETECTIONS, MANIFEST, SEGMENTS, VIDEOS

# Frame counts as decord reports them (jobs/samples/videos/README.md).
SAMPLE_FRAMES = {"decord_flipping_a_pancake.mkv": 310, "mma_test.mp4": 300, "mma_test.avi": 164,
                 "mma_part_0.mp4": 32, "mma_demo_spatiotemporal_det.mp4": 57,
                 "decord_video_90.mov": 3, "decord_unordered.mov": 4,
                 "decord_corrupted.mp4": 50}
GENERATED_FRAMES = {"generated_scene_0.mp4": 96, "generated_scene_1.mp4": 96}


def model_override(model: dict) -> str:
    return "model=" + json.dumps({**model, "score_threshold": 0.0})


def read(path):
    return pq.read_table(path)


def name(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


def test_demo_on_the_sample_clips(ray_session, tiny_detector, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--set", model_override(tiny_detector),
                 "--set", "pruning.method=none", "--set", "decode.fps=5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "ok 9 · partial 1 · error 0" in captured.out, captured.out
    assert f"{out}/videos/videos.parquet" in captured.out

    videos = read(out / "videos" / "videos.parquet")
    assert videos.schema == VIDEOS
    rows = {name(v["uri"]): v for v in videos.to_pylist()}
    assert {k: v["frames_total"] for k, v in rows.items()} == {**SAMPLE_FRAMES,
                                                                **GENERATED_FRAMES}
    broken = rows.pop("decord_corrupted.mp4")
    # Frames 0, 2, ... 26 decode (10 fps sampled at 5), then the stream breaks at frame 28.
    assert broken["status"] == "partial" and broken["frames_decoded"] == 14, broken
    assert broken["error"].startswith("decoding failed at frame 28"), broken
    for v in rows.values():
        assert v["status"] == "ok" and v["error"] is None, v
        assert v["frames_decoded"] == v["frames_expected"] > 0
        assert v["gmacs_dense"] > 0 and v["gmacs_run"] == pytest.approx(v["gmacs_dense"])
        assert v["savings"] == pytest.approx(0.0, abs=1e-9)
        assert v["method"] == "none" and json.loads(v["params"]) == {}
        assert v["model"] == "vitdet-ti@tiny-det.safetensors" and v["device"] == "cpu"

    # With score_threshold 0 every sampled frame has detections: the annotations show
    # exactly the frames the job sampled, in each video's own frame numbering.
    ann = read(out / "annotations")
    assert ann.schema == DETECTIONS
    frames = ann.to_pandas().groupby("uri")["frame_index"].apply(lambda s: sorted(set(s)))
    for uri, got in frames.items():
        v = next(r for r in videos.to_pylist() if r["uri"] == uri)
        expected = sampled_indices(0, v["frames_total"], sampling_ratio(v["fps"], 5.0))
        if name(uri) == "decord_corrupted.mp4":
            expected = [i for i in expected if i < 28]
        assert got == expected, uri
    assert len(frames) == 10
    # Boxes lie in their frame and cover some of it (an untrained model regresses many sizes
    # to zero or below, and boxes beyond the border: none of those is written).
    boxes = ann.to_pandas().merge(videos.to_pandas()[["uri", "width", "height"]], on="uri")
    assert ((boxes.x0 >= 0) & (boxes.x0 < boxes.x1) & (boxes.x1 <= boxes.width)).all()
    assert ((boxes.y0 >= 0) & (boxes.y0 < boxes.y1) & (boxes.y1 <= boxes.height)).all()

    manifest = read(out / "manifest" / "manifest.parquet")
    assert manifest.schema == MANIFEST and manifest.num_rows == 10
    segments = read(out / "segments")
    assert segments.schema == SEGMENTS
    # One actor, one segment per call: segments started in manifest order (most work first).
    started = segments.to_pandas().set_index("segment_id")["started_at"]
    order = [started[s] for s in manifest.column("segment_id").to_pylist()]
    assert order == sorted(order), segments.to_pandas()[["uri", "started_at"]]

    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "finished" and job["segments"]["run"] == 10
    assert job["spec"]["output"]["uri"] == str(out) and job["versions"]["ray"]
    assert job["totals"]["videos_partial"] == 1


def test_demo_defaults_save_compute(ray_session, tmp_path, capsys):
    """The demo as a new user runs it: the default zoo model with the pruning its card
    recommends saves compute on every video, against the same model run densely."""
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--set", "decode.fps=5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    job = json.loads((out / "job.json").read_text())
    card = zoo_entries()[job["spec"]["model"]["name"]].card["pruning"]
    assert job["spec"]["pruning"]["method"] == card["default_method"]
    for v in read(out / "videos" / "videos.parquet").to_pylist():
        if v["frames_decoded"] > 1:  # a video's first frame always runs densely
            assert v["gmacs_run"] < v["gmacs_dense"], v
    assert job["totals"]["savings"] > 0.2, job["totals"]


def write_spec(path, **sections):
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_segments_resume_overwrite_and_error_modes(ray_session, tiny_detector, video_factory,
                                                   tmp_path, capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    video_factory(videos / "long.mp4", 95)
    video_factory(videos / "short.mp4", 7)
    spec = write_spec(tmp_path / "job.yaml", input={"uri": str(videos)},
                      model={**tiny_detector, "score_threshold": 0.0},
                      pruning={"method": "none"}, decode={"segment_frames": 16},
                      resources={"actors": 2, "streams_per_actor": 2},
                      output={"uri": str(out)})

    assert main(["run", spec]) == 0, capsys.readouterr().err
    ann = read(out / "annotations").to_pandas()
    long = ann[ann["uri"].str.endswith("long.mp4")]
    # Six segments, every frame exactly once: each frame comes from one segment only.
    assert sorted(set(long["frame_index"])) == list(range(95))
    assert long.groupby("frame_index")["segment_id"].nunique().max() == 1
    assert long["segment_id"].nunique() == 6
    # and once within it (how many boxes a frame has varies: boxes without area are dropped)
    assert not long.duplicated(["frame_index", "label_id", "x0", "y0", "x1", "y1"]).any()
    rows = {name(v["uri"]): v for v in read(out / "videos" / "videos.parquet").to_pylist()}
    assert rows["long.mp4"]["segments"] == 6 and rows["long.mp4"]["frames_decoded"] == 95
    assert rows["long.mp4"]["status"] == "ok" and rows["short.mp4"]["frames_decoded"] == 7
    first_job = json.loads((out / "job.json").read_text())["job_id"]

    # error: a non-empty output is refused, nothing is touched.
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["run", spec, "--set", "output.mode=error"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before

    # A different spec cannot resume into this output.
    assert main(["run", spec, "--set", "model.score_threshold=0.5"]) == 2
    assert "differs in: model.score_threshold" in capsys.readouterr().err

    # resume after a crash: one segment lost its marker (its annotations stayed behind), a
    # video was added and one removed. Only the missing work runs; nothing is duplicated.
    segs = read(out / "segments").to_pandas()
    lost = segs[(segs["uri"].str.endswith("long.mp4")) & (segs["segment_index"] == 3)]
    lost_id = lost["segment_id"].iloc[0]
    os.unlink(out / "segments" / f"{lost_id}.parquet")
    video_factory(videos / "new.mp4", 20)
    os.unlink(videos / "short.mp4")
    capsys.readouterr()
    assert main(["run", spec]) == 0
    assert "(1 known from the earlier run)" in capsys.readouterr().err  # long.mp4: not reopened
    job = json.loads((out / "job.json").read_text())
    assert job["segments"] == {"total": 8, "skipped": 5, "run": 3, "unreadable_videos": 0}
    assert job["previous_runs"][0]["job_id"] == first_job
    segs = read(out / "segments").to_pandas()
    rerun = set(segs[segs["job_id"] == job["job_id"]]["segment_id"])
    new_ids = set(segs[segs["uri"].str.endswith("new.mp4")]["segment_id"])
    assert rerun == new_ids | {lost_id} and len(new_ids) == 2
    ann = read(out / "annotations").to_pandas()
    assert not ann["uri"].str.endswith("short.mp4").any()  # its files went with it
    assert not ann.duplicated(["segment_id", "frame_index", "label_id", "x0", "y0"]).any()
    long = ann[ann["uri"].str.endswith("long.mp4")]
    assert sorted(set(long["frame_index"])) == list(range(95))
    assert long.groupby("frame_index")["segment_id"].nunique().max() == 1
    videos_table = read(out / "videos" / "videos.parquet").to_pylist()
    assert sorted(name(v["uri"]) for v in videos_table) == ["long.mp4", "new.mp4"]

    # overwrite: everything runs again under the new job id.
    (out / "report").mkdir()
    assert main(["run", spec, "--set", "output.mode=overwrite"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert job["segments"]["run"] == 8 and job["previous_runs"] == []
    assert set(read(out / "segments").to_pandas()["job_id"]) == {job["job_id"]}
    assert not (out / "report").exists()


def test_outputs_that_are_not_vidprune_outputs_are_never_touched(tmp_path, tiny_detector,
                                                                 capsys, sample_videos):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    for mode in ("resume", "overwrite"):
        spec = write_spec(tmp_path / f"{mode}.yaml", input={"uri": str(sample_videos)},
                          model=tiny_detector, pruning={"method": "none"},
                          output={"uri": str(out), "mode": mode})
        assert main(["run", spec]) == 2
        assert "does not look like a vidprune output" in capsys.readouterr().err
    assert os.listdir(out) == ["thesis.tex"]


def test_actors_no_node_can_hold_are_refused_before_anything_is_written(
        ray_session, tmp_path, tiny_detector, sample_videos, capsys):
    """Ray would wait forever for a node with that many CPUs (or GPUs): refused, exit 2."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", input={"uri": str(sample_videos)},
                      model=tiny_detector, pruning={"method": "none"}, output={"uri": str(out)})
    cpus = max(n["Resources"].get("CPU", 0) for n in ray_session.nodes() if n["Alive"])
    assert main(["run", spec, "--set", f"resources.cpus_per_actor={cpus + 1:g}"]) == 2
    err = capsys.readouterr().err
    assert "resources.cpus_per_actor" in err and f"{cpus:g} CPUs" in err
    assert not out.exists()


@pytest.mark.parametrize("model, pruning, error", [
    # STA's r for the clip's token groups at the input size the job runs, not the model's own
    ({"name": "videomae-synth", "input_size": 32}, {"method": "sta"},
     "sta: r = 24 is too large for groups of 4 tokens"),
    ("tiny_detector", {"method": "rollout", "k": 64}, "k=64 exceeds the 16 tokens"),
])
def test_a_method_that_cannot_run_at_the_jobs_input_size_is_refused(
        model, pruning, error, request, tmp_path, sample_videos, capsys):
    if isinstance(model, str):
        model = request.getfixturevalue(model)
    spec = write_spec(tmp_path / "job.yaml", input={"uri": str(sample_videos)}, model=model,
                      pruning=pruning, output={"uri": str(tmp_path / "out")})
    assert main(["run", spec, "--dry-run"]) == 2
    assert error in capsys.readouterr().err


def test_a_ray_client_address_is_refused_with_what_to_do(tmp_path, tiny_detector,
                                                        sample_videos, capsys, monkeypatch):
    """Ray Data's executor fails through Ray Client (the cluster test shows it): RAY_ADDRESS
    or --address ray://... is refused before anything starts."""
    spec = write_spec(tmp_path / "job.yaml", input={"uri": str(sample_videos)},
                      model=tiny_detector, pruning={"method": "none"},
                      output={"uri": str(tmp_path / "out")})
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    assert main(["run", spec]) == 2
    assert "vidprune submit" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_clip_frames_that_split_a_tubelet_are_refused(tmp_path, tiny_recognizer,
                                                      sample_videos, capsys):
    """VideoMAE steps by tubelets of 2 frames: a clip of 5 would run 4 and report 5."""
    spec = write_spec(tmp_path / "job.yaml", input={"uri": str(sample_videos)},
                      model=tiny_recognizer, pruning={"method": "none"},
                      decode={"clip_frames": 5}, output={"uri": str(tmp_path / "out")})
    assert main(["run", spec, "--dry-run"]) == 2
    assert "decode.clip_frames 5 is not a multiple of the model's tubelet (2 frames)" in \
        capsys.readouterr().err
    assert main(["run", spec, "--dry-run", "--set", "decode.clip_frames=6"]) == 0


def test_dry_run_writes_nothing(tmp_path, tiny_detector, sample_videos, capsys):
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", input={"uri": str(sample_videos)},
                      model=tiny_detector, pruning={"method": "none"}, output={"uri": str(out)})
    assert main(["run", spec, "--dry-run"]) == 0
    assert "8 video(s)" in capsys.readouterr().out and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", spec, "--dry-run", "--set", f"input.uri={empty}"]) == 2
    assert "input.patterns: no videos" in capsys.readouterr().err
    shutil.rmtree(empty)


@pytest.mark.parametrize("output, reason", [
    ("/proc/vidprune-test/out", "/proc is on a proc file system, where no files can be created"),
    ("{tmp}/a-file/out", "a-file is a file, not a folder"),
])
def test_an_output_that_cannot_be_written_is_refused_before_anything(
        output, reason, tmp_path, tiny_detector, sample_videos, capsys):
    """The dry run said such an output was fine and the run failed at the lock; both refuse
    it now, naming output.uri, having written nothing (the real run before Ray starts)."""
    (tmp_path / "a-file").write_text("mine")
    output = output.format(tmp=tmp_path)
    spec = write_spec(tmp_path / "job.yaml", input={"uri": str(sample_videos)},
                      model=tiny_detector, pruning={"method": "none"}, output={"uri": output})
    for extra in (["--dry-run"], []):
        assert main(["run", spec, *extra]) == 2
        err = capsys.readouterr().err
        assert f"vidprune run: error: output.uri: cannot write to {output}: " in err, err
        assert reason in err and "Traceback" not in err and "note:" not in err, err
    assert (tmp_path / "a-file").read_text() == "mine"


def test_recognition_outputs_of_the_earlier_annotation_format_are_not_resumed(tmp_path):
    """Clips gained a `frames` column: a recognition output written before it is refused
    for resume (its files would mix two schemas), with the reason; detection fingerprints
    are unchanged."""
    from types import SimpleNamespace as NS

    from pipeline.job import JobRefused, _check_output, _fingerprint_inputs
    from pipeline.manifest import fingerprint
    from pipeline.storage import Location

    spec = NS(decode=NS(fps=None, segment_frames=64, frame_stride=4, backend="pyav"),
              output=NS(uri=str(tmp_path), mode="resume"))
    model = {"task": "recognition", "name": "videomae-synth", "input_size": 112}
    now = _fingerprint_inputs(spec, model, "sta", {"r": 24}, None)
    before = {k: v for k, v in now.items() if k != "annotation_format"}
    (tmp_path / "job.json").write_text(json.dumps(
        {"fingerprint": fingerprint(before), "fingerprint_inputs": before}))
    with pytest.raises(JobRefused, match="differs in: annotation_format"):
        _check_output(spec, Location.open(str(tmp_path)), fingerprint(now), now)
    assert _check_output(spec, Location.open(str(tmp_path)), fingerprint(before), before)
    detection = _fingerprint_inputs(spec, {**model, "task": "detection"}, "none", {}, None)
    assert "annotation_format" not in detection


def test_progress_lines_count_the_frames_of_segments_still_running(
        ray_session, tmp_path, tiny_detector, video_factory):
    """One long segment: lines with its frames come while it runs, not only when it ends."""
    import re

    from jobs.spec import load_spec
    from pipeline.job import execute, plan_job

    video_factory(tmp_path / "videos" / "long.mp4", 240)
    spec_path = write_spec(tmp_path / "job.yaml", input={"uri": str(tmp_path / "videos")},
                           model=tiny_detector, pruning={"method": "none"},
                           decode={"segment_frames": 4096},
                           output={"uri": str(tmp_path / "out")})
    spec, _ = load_spec(spec_path, [])
    plan = plan_job(spec)
    plan.progress_every_s = 0.2
    lines: list[str] = []
    result = execute(plan, lines.append)
    assert result.status == "finished" and result.totals["frames_decoded"] == 240
    running = [int(m.group(1).replace(",", "")) for line in lines
               if (m := re.match(r"progress: 0/1 videos · ([\d,]+) frames", line))]
    assert running and 0 < max(running) <= 240, lines
    # no segment finished yet: its savings are not known, and not shown as 0 %
    assert all("savings - ·" in line for line in lines if line.startswith("progress: 0/1"))
    assert any(line.startswith("progress: 1/1 videos · 240 frames") for line in lines), lines


def test_an_interrupted_run_records_every_segment_it_completed(
        ray_session, tmp_path, tiny_detector, video_factory):
    """Ctrl-C after the first finished segment: job.json says interrupted, and its count of
    segments run is the segments this run wrote (some may finish after the interrupt)."""
    import threading

    from jobs.spec import load_spec
    from pipeline.job import execute, plan_job

    for i in range(2):
        video_factory(tmp_path / "videos" / f"v{i}.mp4", 24)
    spec_path = write_spec(tmp_path / "job.yaml", input={"uri": str(tmp_path / "videos")},
                           model=tiny_detector, pruning={"method": "none"},
                           decode={"segment_frames": 8}, resources={"actors": 2},
                           output={"uri": str(tmp_path / "out")})
    spec, _ = load_spec(spec_path, [])
    plan = plan_job(spec)
    pressed = []

    def log(line):
        main = threading.current_thread() is threading.main_thread()
        if line.startswith("progress:") and not pressed and main:
            pressed.append(line)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(plan, log)
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["status"] == "interrupted" and job["error"] == "interrupted (SIGINT, Ctrl-C)"
    segments = read(tmp_path / "out" / "segments").to_pylist()
    mine = [s for s in segments if s["job_id"] == job["job_id"]]
    assert 1 <= len(mine) <= 6 and job["segments"]["run"] == len(mine)
