"""Jobs on a real two-node Ray cluster (``cluster.py``), submitted with the CLI.

1. On S3 (the moto server): submit, refuse a second submission while it runs, kill the
   driver mid-job, submit again (resume): every video exactly once, and the second run did
   exactly the segments the first left unfinished. Then the report, the live metrics, and
   no credential in anything vidprune wrote or printed.
2. On local folders: kill the worker node mid-job; its segments are retried on the head
   and the job finishes with every video exactly once.

The node kill comes last: it leaves the cluster with the head only.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
import urllib.request

import pyarrow.parquet as pq
import yaml

from jobs.cli import main
from pipeline.storage import filesystem

FRAMES, VIDEOS, SEGMENT = 64, 4, 8    # 32 segments: long enough to be killed half-way


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def job_spec(tmp_path, model, input_uri, output_uri, storage=None) -> str:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "nightly",
        "input": {"uri": input_uri, **({"storage": storage} if storage else {})},
        "model": {**model, "score_threshold": 0.0},   # every frame has detections
        "pruning": {"method": "eventful", "r": 4},
        "decode": {"segment_frames": SEGMENT},
        "resources": {"actors": 2},
        "output": {"uri": output_uri},
    }))
    return str(spec)


def check_exactly_once(segments, annotations, manifest_ids):
    """Every segment of the manifest has one stats row; every frame of every video was
    annotated by exactly one segment, with no row twice."""
    assert sorted(s["segment_id"] for s in segments) == sorted(manifest_ids)
    assert all(s["status"] == "ok" and s["frames_decoded"] == SEGMENT for s in segments)
    ann = annotations.to_pandas()
    assert not ann.duplicated().any()
    per_segment = ann.groupby("segment_id").size().to_dict()
    assert per_segment == {s["segment_id"]: s["annotations"] for s in segments}
    for uri, rows in ann.groupby("uri"):
        assert sorted(set(rows["frame_index"])) == list(range(FRAMES)), uri
        assert rows.groupby("frame_index")["segment_id"].nunique().max() == 1, uri
    assert ann["uri"].nunique() == VIDEOS


def metric_values(cluster, name: str) -> list[tuple[str, float]]:
    """``(labels, value)`` of a Prometheus series on every node's metrics port."""
    found = []
    for node in cluster.nodes:
        if node.proc.poll() is not None:
            continue
        try:
            text = urllib.request.urlopen(
                f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        for m in re.finditer(rf"^{name}{{([^}}]*)}} ([0-9.e+]+)$", text, re.M):
            found.append((m.group(1), float(m.group(2))))
    return found


def test_submit_kill_the_driver_and_resume_on_s3(cluster, s3, tiny_detector, video_factory,
                                                 tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    fs, _ = filesystem("s3://archive", endpoint_url=s3.endpoint_url)
    fs.mkdir("archive")
    fs.mkdir("runs")
    for i in range(VIDEOS):
        fs.put(str(video_factory(tmp_path / f"v{i}.mp4", FRAMES)), f"archive/videos/v{i}.mp4")
    fs.put(tiny_detector["checkpoint"], "archive/models/det.safetensors")
    model = {**tiny_detector, "checkpoint": "s3://archive/models/det.safetensors"}
    spec = job_spec(tmp_path, model, "s3://archive/videos/", "s3://runs/nightly/",
                    {"endpoint_url": s3.endpoint_url})
    address = ["--address", cluster.dashboard_url]
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]

    assert main(["submit", spec, *address]) == 0
    out = capsys.readouterr().out
    assert "submitted vidprune-nightly-1" in out
    assert "AWS_SECRET_ACCESS_KEY" in out and secret not in out  # names, never values
    assert main(["submit", spec, *address]) == 2                  # it is running
    assert "already" in capsys.readouterr().err

    client = JobSubmissionClient(cluster.dashboard_url)

    def markers():
        try:
            return [p.rsplit("/", 1)[1] for p in fs.ls("runs/nightly/segments", refresh=True)]
        except FileNotFoundError:
            return []

    def some_done():
        status = str(client.get_job_status("vidprune-nightly-1"))
        assert status in ("PENDING", "RUNNING"), client.get_job_logs("vidprune-nightly-1")
        return len(markers()) >= 4

    wait_for(some_done, 240, "the first segments of attempt 1")
    # While it runs, the savings are on the nodes' metrics ports.
    frames = wait_for(lambda: [v for labels, v in metric_values(
        cluster, "ray_vidprune_frames_total") if 'job="nightly"' in labels
        and 'method="eventful"' in labels], 30, "the frames metric")
    assert sum(frames) >= SEGMENT

    info = client.get_job_info("vidprune-nightly-1")
    os.kill(int(info.driver_info.pid), signal.SIGKILL)    # the driver dies mid-job
    wait_for(lambda: str(client.get_job_status("vidprune-nightly-1")) == "FAILED", 60,
             "attempt 1 to fail")
    # Its actors die with it; once they are gone nothing of attempt 1 writes any more.
    def annotators_alive():
        alive = list_actors(address=cluster.dashboard_url, filters=[
            ("job_id", "=", info.job_id), ("state", "=", "ALIVE")])
        return [a for a in alive if "Annotator" in a.class_name]

    wait_for(lambda: not annotators_alive(), 60, "attempt 1's actors to die")
    first = {name: fs.cat_file(f"runs/nightly/segments/{name}") for name in markers()}
    job1 = json.loads(fs.cat_file("runs/nightly/job.json"))
    assert job1["status"] == "running"            # killed: it could not record its end
    total = VIDEOS * FRAMES // SEGMENT
    assert 0 < len(first) < total

    capsys.readouterr()
    assert main(["submit", spec, *address, "--wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted vidprune-nightly-2" in out and "vidprune-nightly-2: SUCCEEDED" in out
    assert f"{len(first)} already complete" in out

    def table(path):
        return pq.read_table(io.BytesIO(fs.cat_file(f"runs/nightly/{path}")))

    job2 = json.loads(fs.cat_file("runs/nightly/job.json"))
    assert job2["status"] == "finished"
    assert job2["segments"]["skipped"] == len(first)
    assert job2["segments"]["run"] == total - len(first)
    assert job2["previous_runs"][-1]["job_id"] == job1["job_id"]
    # Only the unfinished work was redone: the first run's markers are untouched, and
    # every other segment was run by the second.
    for name, data in first.items():
        assert fs.cat_file(f"runs/nightly/segments/{name}") == data
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("runs/nightly/segments", refresh=True))
    segments = pq.ParquetDataset([f"runs/nightly/segments/{n}" for n in names],
                                 filesystem=fs).read().to_pylist()
    by_run = {s["segment_id"]: s["job_id"] for s in segments}
    assert {f"{sid}.parquet" for sid, j in by_run.items() if j == job1["job_id"]} == set(first)
    assert sum(j == job2["job_id"] for j in by_run.values()) == total - len(first)
    manifest_ids = table("manifest/manifest.parquet").column("segment_id").to_pylist()
    annotations = pq.ParquetDataset(
        [f"runs/nightly/annotations/{n}" for n in names], filesystem=fs).read()
    check_exactly_once(segments, annotations, manifest_ids)
    videos = table("videos/videos.parquet").to_pylist()
    assert len(videos) == VIDEOS and all(v["status"] == "ok" and
                                         v["frames_decoded"] == FRAMES for v in videos)
    assert {s["node_id"] for s in segments} >= {cluster.nodes[1].node_id}  # the worker ran some

    # The report, from S3, written next to the outputs.
    assert main(["report", "s3://runs/nightly", "--endpoint-url", s3.endpoint_url]) == 0
    summary = json.loads(fs.cat_file("runs/nightly/report/summary.json"))
    (s,) = summary["outputs"]
    assert s["totals"]["frames_decoded"] == VIDEOS * FRAMES
    assert [r["job_id"] for r in s["runs"]] == [job1["job_id"], job2["job_id"]]
    assert sum(n["segments"] for n in s["per_node"]) == total

    capsys.readouterr()
    assert main(["logs", "nightly", *address]) == 0
    assert main(["status", "nightly", *address]) == 0
    printed = capsys.readouterr().out
    assert "vidprune-nightly-2  SUCCEEDED" in printed
    assert f"{total}/{total} segment(s) complete" in printed
    assert "progress:" in printed                 # the driver's log came back
    assert secret not in printed
    everything = b"".join(fs.cat_file(p) for p in fs.find("runs/nightly"))
    assert secret.encode() not in everything


def test_a_worker_node_lost_mid_job(cluster, tiny_detector, video_factory, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    videos, out = tmp_path / "videos", tmp_path / "out"
    for i in range(VIDEOS):
        video_factory(videos / f"v{i}.mp4", FRAMES)
    spec = job_spec(tmp_path, tiny_detector, str(videos), str(out))
    address = ["--address", cluster.dashboard_url]
    worker = next(n for n in cluster.nodes[1:] if n.proc.poll() is None)

    assert main(["submit", spec, *address]) == 0
    sid = re.search(r"submitted (\S+)", capsys.readouterr().out).group(1)
    client = JobSubmissionClient(cluster.dashboard_url)

    def on_worker():
        assert str(client.get_job_status(sid)) in ("PENDING", "RUNNING"), \
            client.get_job_logs(sid)
        done = list((out / "segments").glob("*.parquet")) if (out / "segments").exists() \
            else []
        return done and any(pq.read_table(p)["node_id"][0].as_py() == worker.node_id
                            for p in done)

    wait_for(on_worker, 240, "a segment finished on the worker node")
    before = len(list((out / "segments").glob("*.parquet")))
    worker.kill()
    job = wait_for(lambda: (j := client.get_job_info(sid)) and
                   str(j.status) not in ("PENDING", "RUNNING") and j, 300, "the job to end")
    assert str(job.status) == "SUCCEEDED", client.get_job_logs(sid)

    segments = pq.read_table(out / "segments").to_pylist()
    manifest_ids = pq.read_table(out / "manifest").column("segment_id").to_pylist()
    assert before < len(manifest_ids)          # the node died with work left
    check_exactly_once(segments, pq.read_table(out / "annotations"), manifest_ids)
    summary = json.loads((out / "job.json").read_text())
    assert summary["status"] == "finished" and summary["segments"]["run"] == len(manifest_ids)
    nodes = {s["node_id"] for s in segments}
    assert worker.node_id in nodes and cluster.nodes[0].node_id in nodes
