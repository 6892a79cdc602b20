"""Credentials never leak, and faults of the store become rows: a real S3 job (moto server,
real Ray) whose objects vanish (404), turn unreadable (403: moved to Glacier) or stop
answering (a stalled read) between listing and decoding, after two refusals over bad
checkpoints; then every byte the job wrote, printed or logged is searched for the secret
access key and session token in the environment."""

import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from jobs.cli import main
from jobs.spec import load_spec
from pipeline.job import run_job
from pipeline.listing import AMBIGUOUS, FOLDER
from pipeline.storage import Location
from tests.badinput import noise, video
from tests.faults import FlakyFront


def ray_log_dir() -> Path:
    import ray

    node = ray._private.worker._global_node
    return Path(node.get_session_dir_path()) / "logs"


def test_no_credentials_anywhere_after_an_s3_job_with_errors(ray_session, s3, tiny_detector,
                                                             sample_videos, tmp_path, capfd):
    secrets_ = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_SESSION_TOKEN"]]
    assert all(s.startswith("canary-") for s in secrets_)  # the conftest's canaries
    store = Location.open("s3://archive", endpoint_url=s3.endpoint_url).fs
    store.mkdir("archive")
    store.mkdir("runs")
    good = video(tmp_path / "good.mp4", 24)
    for name in ("good.mp4", "gone.mp4"):
        store.put(str(good), f"archive/videos/{name}")
    # Probes read a video's first and last 4 MB chunk (its header) through the node's chunk
    # cache: these are large enough that decoding needs a chunk no probe fetched.
    big = noise(tmp_path / "big.mp4")
    assert big.stat().st_size > 9 << 20
    for name in ("cold.mp4", "stall.mp4"):
        store.put(str(big), f"archive/videos/{name}")
    store.put(str(sample_videos / "decord_corrupted.mp4"), "archive/videos/corrupted.mp4")
    store.pipe_file("archive/videos/notes.mp4", b"not a video at all\n")
    store.put(tiny_detector["checkpoint"], "archive/models/det.safetensors")
    store.put(tiny_detector["checkpoint"], "archive/models/cold.safetensors")

    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint_url)

    def to_glacier(key):
        client.copy_object(Bucket="archive", Key=key, StorageClass="GLACIER",
                           CopySource={"Bucket": "archive", "Key": key})

    to_glacier("models/cold.safetensors")
    # Keys that other tools resolve to other objects, and a folder marker named like a video.
    for key in ("videos/../escape.mp4", "videos/a//b.mp4", "videos/dir.mp4/"):
        client.put_object(Bucket="archive", Key=key, Body=b"" if key.endswith("/") else
                          good.read_bytes())
    front = FlakyFront(s3.port)
    try:
        spec = {
            "name": "leaks",
            "input": {"uri": "s3://archive/videos/",
                      "storage": {"endpoint_url": front.url}},
            "model": {**tiny_detector, "checkpoint": "s3://archive/models/det.safetensors"},
            "pruning": {"method": "none"},
            "decode": {"timeout_s": 3, "retries": 1},
            "output": {"uri": "s3://runs/leaks/", "storage": {"endpoint_url": s3.endpoint_url}},
        }
        path = tmp_path / "job.yaml"
        # Refused before anything is written: a checkpoint that is not there, and one that
        # cannot be read (403).
        for bad in ("s3://archive/models/missing.safetensors",
                    "s3://archive/models/cold.safetensors"):
            path.write_text(yaml.safe_dump({**spec, "model": {**spec["model"],
                                                              "checkpoint": bad}}))
            assert main(["run", str(path)]) == 2
        err = capfd.readouterr().err
        assert "missing.safetensors does not exist" in err
        assert "storage class" in err  # the 403's own reason

        def between_listing_and_decoding(line):
            print(line, flush=True)
            if " to run on " in line:
                store.rm("archive/videos/gone.mp4")
                to_glacier("videos/cold.mp4")
                front.stall("GET", r"/videos/stall\.mp4")

        path.write_text(yaml.safe_dump(spec))
        job_spec, _ = load_spec(str(path))
        result = run_job(job_spec, log=between_listing_and_decoding)
        assert front.stalled >= 1
    finally:
        front.close()

    assert result.status == "finished"
    videos = {v["uri"][len("s3://archive/videos/"):]: v for v in pq.read_table(io.BytesIO(
        store.cat_file("runs/leaks/videos/videos.parquet"))).to_pylist()}
    assert videos["good.mp4"]["status"] == "ok" and videos["good.mp4"]["frames_decoded"] == 24
    assert videos["corrupted.mp4"]["status"] == "partial"
    assert videos["gone.mp4"]["status"] == "error"
    assert videos["gone.mp4"]["error"] == ("decoding failed at frame 0: the file is gone (not "
                                           "found): it was deleted or moved after the job "
                                           "listed it"), videos["gone.mp4"]
    assert videos["cold.mp4"]["error"].startswith("decoding failed at frame 0: access denied "
                                                  "(403) reading it: "), videos["cold.mp4"]
    assert "storage class" in videos["cold.mp4"]["error"]
    assert videos["stall.mp4"]["error"] == ("decoding failed at frame 0: the decoder made no "
                                            "progress for 3 s (no frame, no input read) and "
                                            "was stopped (2 attempts)"), videos["stall.mp4"]
    assert videos["notes.mp4"]["error"].startswith("not a video: a text file")
    odd = {v["uri"]: v["error"] for v in videos.values() if "escape" in v["uri"]
           or "//b" in v["uri"] or "dir.mp4" in v["uri"]}
    assert odd == {"s3://archive/videos/../escape.mp4": AMBIGUOUS,
                   "s3://archive/videos/a//b.mp4": AMBIGUOUS,
                   "s3://archive/videos/dir.mp4": FOLDER}, odd

    out = capfd.readouterr()
    written = {p: store.cat_file(p) for p in store.find("runs/leaks")}
    assert "runs/leaks/job.json" in written
    assert json.loads(written["runs/leaks/job.json"])["status"] == "finished"
    logs = {str(p): p.read_bytes() for p in ray_log_dir().rglob("*") if p.is_file()}
    assert logs, "no Ray logs to search"
    for secret in secrets_:
        needle = secret.encode()
        assert not [p for p, data in written.items() if needle in data]
        assert secret not in out.out and secret not in out.err
        assert not [p for p, data in logs.items() if needle in data]
