"""The savings report: a dense and a pruned run of the same videos (one unreadable), each
reported alone and then side by side; every number checked against the Parquet outputs."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def run_job(tmp_path, name, model, videos, pruning):
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": name, "input": {"uri": str(videos)}, "model": model, "pruning": pruning,
        "decode": {"segment_frames": 16}, "output": {"uri": str(tmp_path / name)}}))
    assert main(["run", str(spec)]) == 0
    return tmp_path / name


def test_report_of_a_dense_and_a_pruned_run(ray_session, tiny_detector, video_factory,
                                             tmp_path, capsys):
    videos = tmp_path / "videos"
    video_factory(videos / "a.mp4", 40)
    video_factory(videos / "b.mp4", 12)
    (videos / "c.mp4").write_bytes(b"not a video at all")
    dense = run_job(tmp_path, "dense", tiny_detector, videos, {"method": "none"})
    pruned = run_job(tmp_path, "pruned", tiny_detector, videos, {"method": "eventful", "r": 4})
    capsys.readouterr()

    assert main(["report", str(pruned)]) == 0
    printed = capsys.readouterr().out
    assert f"{pruned}/report/report.html" in printed and "savings" in printed
    folder = pruned / "report"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["summary.json", "report.html", "savings_per_video.png", "gmacs_per_output.png",
         "throughput_per_actor.png"])
    for png in folder.glob("*.png"):
        assert png.read_bytes().startswith(PNG)
    (s,) = json.loads((folder / "summary.json").read_text())["outputs"]

    segs = pq.read_table(pruned / "segments").to_pylist()
    frames = sum(r["frames_decoded"] for r in segs)
    dense_g = sum(r["gmacs_dense"] for r in segs)
    run_g = sum(r["gmacs_run"] for r in segs)
    model_s = sum(r["model_s"] for r in segs)
    t = s["totals"]
    assert (t["videos"], t["videos_ok"], t["videos_error"]) == (3, 2, 1)
    assert t["frames_decoded"] == frames == 52
    assert t["gmacs_dense"] == pytest.approx(dense_g) and t["gmacs_run"] == pytest.approx(run_g)
    assert 0 < t["savings"] == pytest.approx(1 - run_g / dense_g)
    assert t["hours_of_video"] == pytest.approx((4.0 + 1.2) / 3600)
    assert s["segments"] == {"total": 4, "complete": 4}  # 40 frames: 3 segments; 12: one
    # The estimate is exactly the documented formula on the measured numbers.
    est = s["estimate"]
    (cpu,) = est["per_device"]
    assert cpu["device"] == "cpu" and cpu["gmacs_per_model_s"] == pytest.approx(run_g / model_s)
    assert est["cpu_hours_saved_est"] == pytest.approx(
        (dense_g - run_g) / (run_g / model_s) / 3600)
    assert est["gpu_hours_saved_est"] == 0
    # Breakdowns add up to the totals.
    for key in ("per_node", "per_actor", "per_model_method"):
        assert sum(g["frames"] for g in s[key]) == frames
        assert sum(g["gmacs_run"] for g in s[key]) == pytest.approx(run_g)
    assert s["per_model_method"][0]["model_method"] == "vitdet-ti@tiny-det.safetensors / eventful"
    (failure,) = s["failures"]
    assert failure["uri"].endswith("c.mp4") and failure["status"] == "error" and failure["error"]
    assert s["savings_per_video"]["count"] == 2
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "c.mp4" in page
    assert "<img alt='savings_per_video.png' src='data:" in page  # self-contained

    # Side by side, with the measured comparison against the dense run.
    out, page_path = tmp_path / "compare", tmp_path / "page" / "report.html"
    assert main(["report", str(dense), str(pruned), "--out", str(out), "--html",
                 str(page_path)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    by_method = {o["method"]: o for o in summary["outputs"]}
    assert by_method["none"]["totals"]["savings"] == pytest.approx(0.0, abs=1e-9)
    assert by_method["eventful"]["totals"]["gmacs_dense"] == pytest.approx(
        by_method["none"]["totals"]["gmacs_dense"])
    m = by_method["eventful"]["measured_vs_dense"]
    dense_videos = pq.read_table(dense / "videos").to_pylist()
    assert m["videos"] == 2 and m["model_s_dense"] == pytest.approx(
        sum(v["model_s"] for v in dense_videos if v["status"] == "ok"))
    assert page_path.read_bytes() == (out / "report.html").read_bytes()

    assert main(["report", str(tmp_path / "videos")]) == 2
    assert "not a vidprune output" in capsys.readouterr().err

    # A job whose job.json still says running: running while its output lock is held and
    # fresh, died once no live driver holds it (killed: the lock is left behind, stale).
    from pipeline.lock import OutputLock
    from pipeline.report import load_output, summarize
    from pipeline.storage import Location

    job_file = pruned / "job.json"
    job = json.loads(job_file.read_text())
    assert s["job"]["status"] == "finished"
    job_file.write_text(json.dumps({**job, "status": "running"}))
    location = Location.open(str(pruned))
    lock = OutputLock(location, job["job_id"], heartbeat_s=3600)
    lock.acquire()
    try:
        assert summarize(load_output(location))["job"]["status"] == "running"
    finally:
        lock.release()
    assert summarize(load_output(location))["job"]["status"] == "died"


def test_work_on_padding_counts_as_executed_and_older_outputs_read_as_none():
    """Ragged streams run side by side leave work on padding rows (``gmacs_padding``): it is
    not saved and it ran, so the totals give savings with it and the estimate's measured rate
    includes it; segments written before the column existed read as null and add nothing."""
    import pyarrow as pa

    from pipeline.report import _estimate, render_html
    from pipeline.results import format_summary, totals

    videos = pa.table({"status": ["ok", "ok"], "gmacs_dense": [100.0, 50.0],
                       "gmacs_run": [40.0, 20.0], "gmacs_padding": [6.0, None],
                       "frames_decoded": [10, 5], "duration_s": [1.0, 0.5],
                       "decode_s": [1.0, 1.0], "model_s": [2.0, 1.0]})
    t = totals(videos)
    assert t["gmacs_padding"] == 6.0
    assert t["savings"] == pytest.approx(1 - 60 / 150)
    assert t["savings_with_padding"] == pytest.approx(1 - 66 / 150)
    printed = format_summary(t, 3.0, "/out")
    assert "GMACs pad" in printed and f"{100 * (1 - 66 / 150):.1f}%" in printed
    assert "GMACs pad" not in format_summary({**t, "gmacs_padding": 0.0}, 3.0, "/out")

    rows = [{"device": "cpu", "gmacs_dense": 100.0, "gmacs_run": 40.0, "gmacs_padding": 6.0,
             "model_s": 2.0},
            {"device": "cpu", "gmacs_dense": 50.0, "gmacs_run": 20.0, "gmacs_padding": None,
             "model_s": 1.0}]
    (cpu,) = _estimate(rows, {"cpus_per_actor": 1})["per_device"]
    assert cpu["gmacs_per_model_s"] == pytest.approx(66 / 3)
    assert cpu["actor_hours_saved_est"] == pytest.approx((150 - 66) / (66 / 3) / 3600)

    estimate = _estimate(rows, {"cpus_per_actor": 1})
    output = {"label": "a", "uri": "/out", "params": {}, "job": {"status": "finished"},
              "segments": {"total": 2, "complete": 2},
              "totals": {**t, "savings_after_first_frames": 0.0}, "estimate": estimate,
              "savings_per_video": {"count": 0}, "runs": [], "per_model_method": [],
              "per_node": [], "per_actor": [], "failures": []}
    page = render_html({"generated_at": "now", "outputs": [output]}, {})
    assert "GMACs on padding" in page and "savings with padding" in page
    output["totals"] = {**output["totals"], "gmacs_padding": 0.0}
    assert "GMACs on padding" not in render_html({"generated_at": "now", "outputs": [output]}, {})


def test_segments_written_before_gmacs_padding_existed_read_with_it_null(tmp_path):
    import datetime

    import pyarrow as pa

    from pipeline.outputs import read_segments
    from pipeline.schemas import SEGMENTS
    from pipeline.storage import Location

    older = pa.schema([f for f in SEGMENTS if f.name != "gmacs_padding"])
    now = datetime.datetime.now(datetime.timezone.utc)

    def value(field):
        if pa.types.is_integer(field.type):
            return 1
        if pa.types.is_floating(field.type):
            return 1.0
        return now if pa.types.is_timestamp(field.type) else "x"

    (tmp_path / "segments").mkdir()
    pq.write_table(pa.Table.from_pylist([{f.name: value(f) for f in older}], schema=older),
                   tmp_path / "segments" / "old.parquet")
    table = read_segments(Location.open(str(tmp_path)))
    assert table.schema == SEGMENTS
    assert table.column("gmacs_padding").to_pylist() == [None]


# -- where the report cannot be written ------------------------------------------------------

def small_output(location) -> None:
    """A job output as a job leaves it before any segment completes: job.json and a manifest
    of one video to run and one that could not be opened (enough to report on, without Ray)."""
    from pipeline.manifest import build_manifest
    from pipeline.storage import parquet_bytes

    probes = [{"uri": "/videos/a.mp4", "identity": "a", "frames_total": 20, "fps": 10.0,
               "width": 64, "height": 48, "duration_s": 2.0, "size_bytes": 100},
              {"uri": "/videos/b.mp4", "identity": "b", "frames_total": 0, "fps": 0.0,
               "width": 0, "height": 0, "duration_s": 0.0, "size_bytes": 5,
               "probe_error": "not a video: a text file"}]
    location.write_bytes("manifest/manifest.parquet",
                         parquet_bytes(build_manifest(probes, 16, "fp")))
    location.write_bytes("job.json", json.dumps({
        "name": "small", "method": "none", "job_id": "small-1",
        "spec": {"model": {"task": "detection"}}}).encode())


@pytest.mark.filterwarnings("ignore:No artists with labels")
@pytest.mark.parametrize("option, target, reason", [
    ("--out", "a-file", "is a file, not a folder"),
    ("--out", "a-file/report", "is a file, not a folder"),
    ("--out", "/proc/vidprune-test/report", "proc file system"),
    ("--html", "a-folder", "is a folder"),
    ("--html", "/proc/vidprune-test/report.html", "proc file system"),
])
def test_a_report_target_that_cannot_be_written_is_refused_in_one_line(
        option, target, reason, tmp_path, capsys):
    """Ordinary mistakes in --out and --html: exit 2 with one line naming the target and
    why, no traceback; the targets are checked before the report is written anywhere."""
    from pipeline.storage import Location

    out = tmp_path / "out"
    small_output(Location.open(str(out)))
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "a-folder").mkdir()
    target = target if target.startswith("/") else str(tmp_path / target)
    assert main(["report", str(out), option, target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("vidprune report: error: cannot write the ")
    assert target in err and reason in err, err
    assert not (out / "report").exists()  # nothing written before the refusal
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_the_html_copy_is_named_where_it_was_written(tmp_path, capsys):
    from pipeline.storage import Location

    out, page = tmp_path / "out", tmp_path / "pages" / "small.html"
    small_output(Location.open(str(out)))
    assert main(["report", str(out), "--html", str(page)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out / "report" / "report.html") in last and str(page) in last, last
    assert page.read_bytes() == (out / "report" / "report.html").read_bytes()


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_a_report_to_a_read_only_s3_output_is_refused_with_what_to_do(s3, tmp_path, capsys):
    """Credentials that may read the output but not write there (here a bucket policy that
    denies writes): the default report location is refused in one line that says to use
    --out; --out elsewhere then works."""
    from pipeline.storage import Location
    from tests.faults import deny_writes

    out = Location.open("s3://runs/small", endpoint_url=s3.endpoint_url)
    out.fs.mkdir("runs")
    small_output(out)
    deny_writes(out)
    assert main(["report", out.uri, "--endpoint-url", s3.endpoint_url]) == 2
    err = capsys.readouterr().err
    assert err == ("vidprune report: error: cannot write the report to s3://runs/small/report: "
                   "access denied; use --out to write it somewhere else\n"), err
    assert out.files("report") == []
    local = tmp_path / "local-report"
    assert main(["report", out.uri, "--endpoint-url", s3.endpoint_url, "--out",
                 str(local)]) == 0
    assert (local / "report.html").exists()

    assert main(["report", out.uri, "--endpoint-url", s3.endpoint_url, "--out",
                 "s3://no-such-bucket/report"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report to s3://no-such-bucket/report: the bucket no-such-bucket " \
           "does not exist" in err, err


def test_a_ragged_job_reports_its_padding_from_run_to_report(ray_session, tiny_detector,
                                                            video_factory, sample_videos,
                                                            tmp_path, capsys):
    """Eventful's threshold on two different videos side by side: the padding work reaches
    the segments, the videos, the job's summary and the report."""
    import shutil

    videos = tmp_path / "videos"
    video_factory(videos / "gen.mp4", 12)
    shutil.copy(sample_videos / "mma_test.mp4", videos / "real.mp4")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"uri": str(videos)}, "model": tiny_detector,
        "pruning": {"method": "eventful", "policy": "threshold", "threshold": 0.5},
        "decode": {"segment_frames": 12, "fps": 10},
        "resources": {"streams_per_actor": 2},
        "output": {"uri": str(tmp_path / "out")}}))
    assert main(["run", str(spec)]) == 0
    printed = capsys.readouterr().out
    segments = pq.read_table(tmp_path / "out" / "segments").to_pylist()
    padding = sum(s["gmacs_padding"] for s in segments)
    assert padding > 0 and "GMACs pad" in printed
    videos_rows = pq.read_table(tmp_path / "out" / "videos").to_pylist()
    assert sum(v["gmacs_padding"] for v in videos_rows) == pytest.approx(padding)
    assert main(["report", str(tmp_path / "out")]) == 0
    assert "with the padding of ragged batches" in capsys.readouterr().out
    (s,) = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())["outputs"]
    t = s["totals"]
    assert t["gmacs_padding"] == pytest.approx(padding)
    assert t["savings_with_padding"] == pytest.approx(
        1 - (t["gmacs_run"] + padding) / t["gmacs_dense"])
