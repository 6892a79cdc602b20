"""The main job end to end against the S3 server (moto on loopback): videos and the
checkpoint read from a bucket (videos streamed through the range proxy), results written to
a bucket; here with a recognizer."""

import io
import json

import pyarrow.parquet as pq
import yaml

from jobs.cli import main
from pipeline.schemas import RECOGNITIONS, VIDEOS
from pipeline.storage import filesystem


def test_recognition_job_from_s3_to_s3(ray_session, s3, tiny_recognizer, sample_videos,
                                       video_factory, tmp_path, capsys):
    fs, _ = filesystem("s3://archive", endpoint_url=s3.endpoint_url)
    fs.mkdir("archive")
    fs.mkdir("runs")
    fs.put(str(sample_videos / "decord_corrupted.mp4"), "archive/videos/broken/corrupted.mp4")
    fs.put(str(sample_videos / "mma_part_0.mp4"), "archive/videos/part 0.mp4")
    fs.put(str(video_factory(tmp_path / "gen.mp4", 40)), "archive/videos/gen.MP4")
    fs.pipe_file("archive/videos/readme.txt", b"not a video")
    fs.put(tiny_recognizer["checkpoint"], "archive/models/rec.safetensors")

    storage = {"endpoint_url": s3.endpoint_url}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "nightly",
        "input": {"uri": "s3://archive/videos/", "storage": storage},
        "model": {**tiny_recognizer, "top_k": 2,
                  "checkpoint": "s3://archive/models/rec.safetensors"},
        "pruning": {"method": "none"},
        "decode": {"frame_stride": 2},
        "output": {"uri": "s3://runs/nightly/"},
    }))
    assert main(["run", str(spec)]) == 0, capsys.readouterr().err

    def table(path):
        return pq.read_table(io.BytesIO(fs.cat_file(f"runs/nightly/{path}")))

    videos = table("videos/videos.parquet")
    assert videos.schema == VIDEOS
    rows = {v["uri"]: v for v in videos.to_pylist()}
    assert sorted(rows) == ["s3://archive/videos/broken/corrupted.mp4",
                            "s3://archive/videos/gen.MP4", "s3://archive/videos/part 0.mp4"]
    broken = rows["s3://archive/videos/broken/corrupted.mp4"]
    assert broken["status"] == "partial" and broken["frames_decoded"] == 14  # 0, 2, ... 26
    assert "127.0.0.1" not in broken["error"]  # the proxy stays out of messages
    gen = rows["s3://archive/videos/gen.MP4"]
    assert gen["status"] == "ok" and gen["frames_decoded"] == 20 and gen["task"] == "recognition"
    assert gen["model"] == "videomae-ti@rec.safetensors"
    assert rows["s3://archive/videos/part 0.mp4"]["status"] == "ok"

    files = [p.rsplit("/", 1)[1] for p in fs.ls("runs/nightly/annotations")]
    ann = pq.ParquetDataset([f"runs/nightly/annotations/{f}" for f in files],
                            filesystem=fs).read()
    assert ann.schema == RECOGNITIONS
    t = ann.to_pandas()
    clips = t[(t["uri"] == "s3://archive/videos/gen.MP4") & (t["rank"] == 1)]
    # 4-frame clips of every 2nd frame at 10 fps.
    assert sorted(clips["first_frame"]) == [0, 8, 16, 24, 32]
    assert sorted(clips["clip_start_s"].round(3)) == [0.0, 0.8, 1.6, 2.4, 3.2]
    assert set(t["rank"]) == {1, 2}

    job = fs.cat_file("runs/nightly/job.json").decode()
    assert json.loads(job)["status"] == "finished"
    everything = b"".join(fs.cat_file(p) for p in fs.find("runs/nightly"))
    assert s3.env["AWS_SECRET_ACCESS_KEY"].encode() not in everything


def test_an_s3_output_that_cannot_be_written_is_refused(ray_session, s3, tiny_detector,
                                                       sample_videos, tmp_path, capsys):
    """A missing bucket is refused by the dry run and the run, before anything is written;
    write access, which only a write can tell, is refused at the job's first write (the
    lock), before job.json. Neither is the note about stores without conditional writes."""
    from pipeline.storage import Location
    from tests.faults import deny_writes

    storage = {"endpoint_url": s3.endpoint_url}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"uri": str(sample_videos / "mma_part_0.mp4")}, "model": tiny_detector,
        "pruning": {"method": "none"},
        "output": {"uri": "s3://no-such-bucket/nightly/", "storage": storage}}))
    for extra in (["--dry-run"], []):
        assert main(["run", str(spec), *extra]) == 2
        err = capsys.readouterr().err
        assert ("vidprune run: error: output.uri: cannot write to s3://no-such-bucket/nightly/: "
                "the bucket no-such-bucket does not exist; choose another output location\n"
                ) in err, err
        assert "conditional writes" not in err and "Traceback" not in err, err

    out = Location.open("s3://runs/nightly", **storage)
    out.fs.mkdir("runs")
    deny_writes(out)
    assert main(["run", str(spec), "--set", "output.uri=s3://runs/nightly/"]) == 2
    err = capsys.readouterr().err
    assert ("vidprune run: error: output.uri: cannot write to s3://runs/nightly/: access denied; "
            "choose another output location, or give the job's credentials write access "
            "there\n") in err, err
    assert "conditional writes" not in err and "Traceback" not in err, err
    assert out.fs.find("runs") == []
