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
    output = {"label": "a", "uri": "/out", "params": {}, "segments": {"total": 2, "complete": 2},
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
