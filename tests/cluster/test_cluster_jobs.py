"""Jobs on a real two-node Ray cluster (``cluster.py``), submitted with the CLI.

1. On S3 (the moto server): submit, refuse a second submission while it runs, stop it,
   submit again and kill that driver mid-job, submit again (resume): every video exactly
   once, and the last run did exactly the segments the others left unfinished. Then the
   report, the live metrics, and no credential in anything vidprune wrote or printed.
2. On local folders: kill the worker node while its actor works; the actor is restarted on
   the head, its segment retried there, and the job finishes with every video exactly once.

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


def check_exactly_once(segments, annotations, manifest_ids, frames=FRAMES):
    """Every segment of the manifest has one stats row; every frame of every video was
    annotated by exactly one segment, with no row twice."""
    assert sorted(s["segment_id"] for s in segments) == sorted(manifest_ids)
    assert all(s["status"] == "ok" and s["frames_decoded"] == SEGMENT for s in segments)
    ann = annotations.to_pandas()
    assert not ann.duplicated().any()
    per_segment = ann.groupby("segment_id").size().to_dict()
    assert per_segment == {s["segment_id"]: s["annotations"] for s in segments}
    for uri, rows in ann.groupby("uri"):
        assert sorted(set(rows["frame_index"])) == list(range(frames)), uri
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


def test_submit_stop_kill_the_driver_and_resume_on_s3(cluster, s3, tiny_detector, video_factory,
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

    def running_with(sid, count):
        status = str(client.get_job_status(sid))
        assert status in ("PENDING", "RUNNING"), client.get_job_logs(sid)
        return len(markers()) >= count

    def gone(sid):
        """Once a stopped or killed attempt's actors are gone, nothing of it writes."""
        job_id = client.get_job_info(sid).job_id
        wait_for(lambda: not [a for a in list_actors(address=cluster.dashboard_url, filters=[
            ("job_id", "=", job_id), ("state", "=", "ALIVE")]) if "Annotator" in a.class_name],
            60, f"the actors of {sid} to end")

    wait_for(lambda: running_with("vidprune-nightly-1", 3), 240, "attempt 1's first segments")
    # While it runs, the savings are on the nodes' metrics ports.
    frames = wait_for(lambda: [v for labels, v in metric_values(
        cluster, "ray_vidprune_frames_total") if 'job="nightly"' in labels
        and 'method="eventful"' in labels], 30, "the frames metric")
    assert sum(frames) >= SEGMENT

    # Stopped: the driver records that it was interrupted.
    assert main(["stop", "nightly", *address]) == 0
    assert "vidprune-nightly-1: STOPPED" in capsys.readouterr().out
    gone("vidprune-nightly-1")
    job1 = json.loads(fs.cat_file("runs/nightly/job.json"))
    assert job1["status"] == "interrupted" and job1["error"].startswith("stopped (SIGTERM")
    stopped_at = len(markers())

    # Resubmitted, then its driver is killed mid-job.
    assert main(["submit", spec, *address]) == 0
    assert "submitted vidprune-nightly-2" in capsys.readouterr().out
    wait_for(lambda: running_with("vidprune-nightly-2", stopped_at + 3), 240,
             "attempt 2's first segments")
    info = client.get_job_info("vidprune-nightly-2")
    os.kill(int(info.driver_info.pid), signal.SIGKILL)
    wait_for(lambda: str(client.get_job_status("vidprune-nightly-2")) == "FAILED", 60,
             "attempt 2 to fail")
    gone("vidprune-nightly-2")
    done_before = {name: fs.cat_file(f"runs/nightly/segments/{name}") for name in markers()}
    job2 = json.loads(fs.cat_file("runs/nightly/job.json"))
    assert job2["status"] == "running"            # killed: it could not record its end
    assert job2["previous_runs"][-1]["status"] == "interrupted"
    total = VIDEOS * FRAMES // SEGMENT
    assert stopped_at < len(done_before) < total

    capsys.readouterr()
    assert main(["submit", spec, *address, "--wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted vidprune-nightly-3" in out and "vidprune-nightly-3: SUCCEEDED" in out
    assert f"{len(done_before)} already complete" in out

    def table(path):
        return pq.read_table(io.BytesIO(fs.cat_file(f"runs/nightly/{path}")))

    job3 = json.loads(fs.cat_file("runs/nightly/job.json"))
    assert job3["status"] == "finished"
    assert job3["segments"]["skipped"] == len(done_before)
    assert job3["segments"]["run"] == total - len(done_before)
    assert [r["job_id"] for r in job3["previous_runs"]] == [job1["job_id"], job2["job_id"]]
    # Only the unfinished work was redone: the earlier runs' markers are untouched, and
    # every other segment was run by the last.
    for name, data in done_before.items():
        assert fs.cat_file(f"runs/nightly/segments/{name}") == data
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("runs/nightly/segments", refresh=True))
    segments = pq.ParquetDataset([f"runs/nightly/segments/{n}" for n in names],
                                 filesystem=fs).read().to_pylist()
    by_run = {s["segment_id"]: s["job_id"] for s in segments}
    earlier = {f"{sid}.parquet" for sid, j in by_run.items() if j != job3["job_id"]}
    assert earlier == set(done_before)
    assert sum(j == job3["job_id"] for j in by_run.values()) == total - len(done_before)
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
    assert [r["job_id"] for r in s["runs"]] == [job1["job_id"], job2["job_id"],
                                                job3["job_id"]]
    assert sum(n["segments"] for n in s["per_node"]) == total

    capsys.readouterr()
    assert main(["status", *address]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == ["vidprune-nightly-1", "STOPPED", "vidprune-nightly-2", "FAILED",
                      "vidprune-nightly-3", "SUCCEEDED"]
    assert main(["logs", "nightly", *address]) == 0
    assert main(["status", "nightly", *address]) == 0
    printed = capsys.readouterr().out
    assert "vidprune-nightly-3  SUCCEEDED" in printed
    assert f"{total}/{total} segment(s) complete" in printed
    assert "progress:" in printed                 # the driver's log came back
    assert secret not in printed
    everything = b"".join(fs.cat_file(p) for p in fs.find("runs/nightly"))
    assert secret.encode() not in everything


def test_run_with_the_clusters_address_ships_the_project(cluster, tiny_detector,
                                                         video_factory, tmp_path):
    """`vidprune run --address HEAD:PORT` (CLUSTER.md): the driver runs here, the packages
    travel to the cluster with the job, and the outputs are complete. A Ray Client address
    (ray://) is refused at once with what to do instead: Ray Data's executor fails there."""
    import subprocess
    import sys
    from pathlib import Path

    from .cluster import node_env

    videos = tmp_path / "videos"
    for i in range(2):
        video_factory(videos / f"v{i}.mp4", 16)
    out = tmp_path / "out"
    spec = tmp_path / "client.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"uri": str(videos)}, "model": tiny_detector,
        "pruning": {"method": "eventful", "r": 4}, "decode": {"segment_frames": 8},
        "resources": {"actors": 1}, "output": {"uri": str(out)}}))
    cli = Path(sys.executable).with_name("vidprune")

    def run(address):
        return subprocess.run([str(cli), "run", str(spec), "--address", address],
                              env=node_env(), cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)

    refused = run(f"ray://127.0.0.1:{cluster.client_port}")
    assert refused.returncode == 2 and "vidprune submit" in refused.stderr
    assert "Traceback" not in refused.stderr and not out.exists()
    done = run(f"127.0.0.1:{cluster.gcs_port}")
    assert done.returncode == 0, done.stderr[-3000:]
    segments = pq.read_table(out / "segments").to_pylist()
    assert len(segments) == 4 and all(s["status"] == "ok" for s in segments)
    assert json.loads((out / "job.json").read_text())["status"] == "finished"


def test_a_worker_node_lost_mid_job(cluster, tiny_detector, video_factory, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    frames = 96   # 48 segments: the worker's actor starts while there is work left
    videos, out = tmp_path / "videos", tmp_path / "out"
    for i in range(VIDEOS):
        video_factory(videos / f"v{i}.mp4", frames)
    spec = job_spec(tmp_path, tiny_detector, str(videos), str(out))
    address = ["--address", cluster.dashboard_url]
    head, worker = cluster.nodes[0], cluster.nodes[1]
    assert worker.proc.poll() is None

    assert main(["submit", spec, *address]) == 0
    sid = re.search(r"submitted (\S+)", capsys.readouterr().out).group(1)
    client = JobSubmissionClient(cluster.dashboard_url)

    def actor_on_worker():
        info = client.get_job_info(sid)
        assert str(info.status) in ("PENDING", "RUNNING"), client.get_job_logs(sid)
        if not info.job_id:
            return None
        return [a.actor_id for a in list_actors(address=cluster.dashboard_url, filters=[
            ("job_id", "=", info.job_id), ("state", "=", "ALIVE"),
            ("node_id", "=", worker.node_id)]) if "Annotator" in a.class_name]

    (lost,) = wait_for(actor_on_worker, 240, "an annotator on the worker node")
    before = len(list((out / "segments").glob("*.parquet")))
    worker.kill()   # every process of the node: the machine is gone
    job = wait_for(lambda: (j := client.get_job_info(sid)) and
                   str(j.status) not in ("PENDING", "RUNNING") and j, 300, "the job to end")
    assert str(job.status) == "SUCCEEDED", client.get_job_logs(sid)

    segments = pq.read_table(out / "segments").to_pylist()
    manifest_ids = pq.read_table(out / "manifest").column("segment_id").to_pylist()
    assert before < len(manifest_ids) - 4       # the node died with work left
    check_exactly_once(segments, pq.read_table(out / "annotations"), manifest_ids, frames)
    summary = json.loads((out / "job.json").read_text())
    assert summary["status"] == "finished" and summary["segments"]["run"] == len(manifest_ids)
    # The lost actor was restarted on the head (same actor id) and ran segments there:
    # at least the one it was running when its node died.
    assert head.node_id in {s["node_id"] for s in segments if s["actor_id"] == lost}
