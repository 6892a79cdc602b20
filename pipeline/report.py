"""The savings report of one or more job outputs: ``summary.json``, ``report.html`` and PNGs.

Every number comes from an output's Parquet files (``pipeline/schemas.py``): the manifest
and the completed segments' stats rows, aggregated exactly as the driver does at the end of
a job (``results.aggregate_videos``), so a report of a job that is still running, or died,
shows what is complete so far. ``job.json`` only names the job and its settings.

Estimated device-hours saved (``estimate`` in the summary), per device kind (``cpu``,
``cuda (<GPU name>)``)::

    executed      = sum(gmacs_run) + sum(gmacs_padding)
    rate          = executed / sum(model_s)                GMACs per actor-second, measured
    hours_saved   = (sum(gmacs_dense) - executed) / rate / 3600           actor-hours
    gpu_hours     = hours_saved * resources.gpus_per_actor  (cuda devices)
    cpu_hours     = hours_saved * resources.cpus_per_actor  (cpu)

It assumes model time scales with backbone MACs at the rate measured on the pruned run.
Pruned steps usually run at a lower MAC rate than dense ones (gathers, smaller matrices),
so this is an upper bound on the time pruning saved. When a dense run (method ``none``) of
the same model over the same videos is among the outputs reported, the report also gives
the measured difference in model time (``measured_vs_dense``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .outputs import JOB_FILE, completed_segments, read_manifest, read_segments
from .results import aggregate_videos, savings, totals
from .storage import Location

REPORT_DIR = "report"
PLOTS = ("savings_per_video.png", "gmacs_per_output.png", "throughput_per_actor.png")


@dataclass
class Output:
    """What the report reads from one job output."""

    location: Location
    job: dict[str, Any]      # job.json
    manifest: pa.Table
    segments: pa.Table       # stats rows of the manifest's completed segments
    videos: pa.Table         # VIDEOS rows recomputed from the two above

    @property
    def label(self) -> str:
        return f"{self.job.get('name')}: {self.job.get('method')}"


def load_output(location: Location) -> Output:
    """Read one output (OSError/ValueError when it is not a vidprune output)."""
    try:
        job = json.loads(location.read_bytes(JOB_FILE))
    except FileNotFoundError:
        raise ValueError(f"{location.uri} holds no {JOB_FILE}: not a vidprune output") from None
    manifest = read_manifest(location)
    ids = set(manifest.column("segment_id").to_pylist())
    segments = read_segments(location, sorted(completed_segments(location) & ids))
    info = {"task": job.get("spec", {}).get("model", {}).get("task", ""),
            "model": job.get("model", ""), "method": job.get("method", ""),
            "params": json.dumps(job.get("params") or {}, sort_keys=True, default=str),
            "job_id": job.get("job_id", "")}
    return Output(location, job, manifest, segments,
                  aggregate_videos(manifest, segments, info))


def _job_status(output: Output) -> str:
    """``job.json``'s status, except that a job it says is running whose output lock has no
    live holder (its driver was killed: no heartbeat, or its process gone on this host) is
    ``died``: its completed segments are kept, and running the same spec resumes it."""
    status = output.job.get("status") or "unknown"
    if status != "running":
        return status
    from .lock import OutputLock

    lock = OutputLock(output.location, "")
    try:
        held = lock.holder()
    except OSError:
        return status
    if held is None or held[1].job_id != output.job.get("job_id") or lock.stale(held[1]):
        return "died"
    return status


# -- numbers ----------------------------------------------------------------------------------

def _group(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Per value of ``key``: segments, frames, GMACs, savings, model and decode time,
    throughput (frames per model-second and per busy second)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[str(r[key])].append(r)
    out = []
    for value, rs in sorted(groups.items()):
        frames = sum(r["frames_decoded"] for r in rs)
        model_s = sum(r["model_s"] for r in rs)
        busy_s = sum(r["wall_s"] for r in rs)
        dense = sum(r["gmacs_dense"] for r in rs)
        run = sum(r["gmacs_run"] for r in rs)
        out.append({
            key: value, "segments": len(rs),
            "segments_failed": sum(r["status"] != "ok" for r in rs),
            "frames": int(frames), "gmacs_dense": dense, "gmacs_run": run,
            "savings": savings(dense, run), "model_s": model_s,
            "decode_s": sum(r["decode_s"] for r in rs), "busy_s": busy_s,
            "frames_per_model_s": frames / model_s if model_s > 0 else 0.0,
            "frames_per_busy_s": frames / busy_s if busy_s > 0 else 0.0,
            "devices": sorted({r["device"] for r in rs}),
            "nodes": sorted({r["node_id"] for r in rs}),
        })
    return out


def _estimate(rows: list[dict[str, Any]], resources: dict[str, Any]) -> dict[str, Any]:
    """Device-hours saved, per device kind (see the module docstring)."""
    by_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_device[r["device"]].append(r)
    devices = []
    gpu_hours = cpu_hours = 0.0
    for device, rs in sorted(by_device.items()):
        # padding rows of ragged batches ran too: in the measured rate and not saved
        run = sum(r["gmacs_run"] + (r.get("gmacs_padding") or 0.0) for r in rs)
        dense = sum(r["gmacs_dense"] for r in rs)
        model_s = sum(r["model_s"] for r in rs)
        rate = run / model_s if model_s > 0 else 0.0
        saved_h = (dense - run) / rate / 3600 if rate > 0 else 0.0
        entry = {"device": device, "gmacs_per_model_s": rate, "model_hours": model_s / 3600,
                 "dense_model_hours_est": dense / rate / 3600 if rate > 0 else 0.0,
                 "actor_hours_saved_est": saved_h}
        if device.startswith("cuda"):
            entry["gpu_hours_saved_est"] = saved_h * float(resources.get("gpus_per_actor") or 0)
            gpu_hours += entry["gpu_hours_saved_est"]
        else:
            entry["cpu_hours_saved_est"] = saved_h * float(resources.get("cpus_per_actor") or 1)
            cpu_hours += entry["cpu_hours_saved_est"]
        devices.append(entry)
    return {"gpu_hours_saved_est": gpu_hours, "cpu_hours_saved_est": cpu_hours,
            "per_device": devices,
            "how": "saved GMACs (dense - run - padding) / measured GMACs executed (run + "
                   "padding) per model-second, per "
                   "device, times the GPUs (CPUs) per actor; assumes model time scales with "
                   "MACs at the pruned run's rate (an upper bound on time saved)"}


def _distribution(values: list[float], bins: int = 20) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    import numpy as np

    a = np.asarray(values, dtype=float)
    counts, edges = np.histogram(a, bins=bins, range=(min(0.0, a.min()), max(1.0, a.max())))
    return {"count": int(a.size), "mean": float(a.mean()), "min": float(a.min()),
            "p10": float(np.percentile(a, 10)), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max()),
            "histogram": {"edges": [float(e) for e in edges], "counts": counts.tolist()}}


def _runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that produced the complete segments (a resumed job has several)."""
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_job[r["job_id"]].append(r)
    out = []
    for job_id, rs in by_job.items():
        start = min(r["started_at"] for r in rs)
        end = max(r["finished_at"] for r in rs)
        frames = sum(r["frames_decoded"] for r in rs)
        span_s = (end - start).total_seconds()
        out.append({"job_id": job_id, "segments": len(rs), "frames": int(frames),
                    "first_start": start.isoformat(), "last_end": end.isoformat(),
                    "span_s": span_s, "frames_per_s": frames / span_s if span_s > 0 else 0.0,
                    "actors": len({r["actor_id"] for r in rs}),
                    "nodes": len({r["node_id"] for r in rs})})
    return sorted(out, key=lambda r: r["first_start"])


def summarize(output: Output) -> dict[str, Any]:
    """The summary of one output (its entry in ``summary.json``)."""
    videos = output.videos.to_pylist()
    segs = output.segments.to_pylist()
    t = totals(output.videos)
    first_dense = sum(v["gmacs_dense_first"] for v in videos)
    first_run = sum(v["gmacs_run_first"] for v in videos)
    t["savings_after_first_frames"] = savings(t["gmacs_dense"] - first_dense,
                                              t["gmacs_run"] - first_run)
    runnable = output.manifest.filter(pc.is_null(output.manifest["probe_error"]))
    spec = output.job.get("spec") or {}
    failures = [{"uri": v["uri"], "status": v["status"], "error": v["error"]}
                for v in videos if v["status"] != "ok"]
    return {
        "uri": output.location.uri, "label": output.label,
        "job": {**{k: output.job.get(k) for k in ("name", "job_id", "started_at",
                                                  "finished_at", "wall_s")},
                "status": _job_status(output)},
        "model": output.job.get("model"), "method": output.job.get("method"),
        "params": output.job.get("params") or {},
        "segments": {"total": runnable.num_rows, "complete": len(segs)},
        "totals": t,
        "estimate": _estimate(segs, spec.get("resources") or {}),
        "runs": _runs(segs),
        "per_node": _group(segs, "node_id"),
        "per_actor": _group(segs, "actor_id"),
        "per_model_method": _group([{**s, "model_method": f"{output.job.get('model')} / "
                                     f"{output.job.get('method')}"} for s in segs],
                                   "model_method"),
        "savings_per_video": _distribution([v["savings"] for v in videos
                                            if v["gmacs_dense"] > 0]),
        "failures": failures,
        "segment_failures": [{"uri": s["uri"], "segment_index": s["segment_index"],
                              "status": s["status"], "error": s["error"]}
                             for s in segs if s["status"] != "ok"],
    }


def _measured_vs_dense(outputs: list[Output], summaries: list[dict[str, Any]]) -> None:
    """For each pruned output with a dense run (method none, same model) among the others:
    model time of both on the videos both completed, measured."""
    dense = [o for o in outputs if o.job.get("method") == "none"]
    for o, summary in zip(outputs, summaries):
        if o.job.get("method") == "none":
            continue
        for d in dense:
            if d.job.get("model") != o.job.get("model"):
                continue
            mine = {v["uri"]: v for v in o.videos.to_pylist() if v["status"] == "ok"}
            theirs = {v["uri"]: v for v in d.videos.to_pylist() if v["status"] == "ok"}
            common = sorted(set(mine) & set(theirs))
            if not common:
                continue
            pruned_s = sum(mine[u]["model_s"] for u in common)
            dense_s = sum(theirs[u]["model_s"] for u in common)
            summary["measured_vs_dense"] = {
                "dense_output": d.location.uri, "videos": len(common),
                "model_s_pruned": pruned_s, "model_s_dense": dense_s,
                "model_s_saved": dense_s - pruned_s,
                "time_savings": 1 - pruned_s / dense_s if dense_s > 0 else 0.0}
            break


def build_summary(outputs: list[Output]) -> dict[str, Any]:
    summaries = [summarize(o) for o in outputs]
    labels = [s["label"] for s in summaries]
    for s in summaries:  # two runs of one job and method: tell them apart by location
        if labels.count(s["label"]) > 1:
            s["label"] += f" ({s['uri'].rstrip('/').rsplit('/', 1)[-1]})"
    _measured_vs_dense(outputs, summaries)
    return {"generated_at": datetime.now(timezone.utc).isoformat(), "outputs": summaries}


# -- plots and HTML ---------------------------------------------------------------------------

def plots(summary: dict[str, Any], outputs: list[Output]) -> dict[str, bytes]:
    """PNG bytes by file name (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for s, o in zip(summary["outputs"], outputs):
        values = [100 * v["savings"] for v in o.videos.to_pylist() if v["gmacs_dense"] > 0]
        if values:
            ax.hist(values, bins=20, range=(min(0, min(values)), 100), alpha=0.6,
                    label=s["label"])
    ax.set_xlabel("savings per video (% of dense backbone GMACs)")
    ax.set_ylabel("videos")
    ax.legend(fontsize=7)
    out["savings_per_video.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [s["label"] for s in summary["outputs"]]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [s["totals"]["gmacs_dense"] for s in summary["outputs"]],
           width=0.4, label="dense")
    ax.bar([x + 0.2 for x in xs], [s["totals"]["gmacs_run"] for s in summary["outputs"]],
           width=0.4, label="run")
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=10)
    ax.set_ylabel("backbone GMACs")
    ax.legend(fontsize=7)
    out["gmacs_per_output.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names, values = [], []
    for s in summary["outputs"]:
        for a in s["per_actor"]:
            names.append(f"{s['job']['name']}:{a['actor_id'][:6]}")
            values.append(a["frames_per_model_s"])
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), names, fontsize=6, rotation=45, ha="right")
    ax.set_ylabel("frames per model-second")
    ax.set_title("throughput per actor", fontsize=9)
    out["throughput_per_actor.png"] = png(fig)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,d}"
    return html.escape(str(value))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(summary: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained page: tables, and the plots embedded as data URIs."""
    outs = summary["outputs"]
    rows = "<tr><th>job status</th>" + "".join(
        f"<td>{html.escape(str(s['job']['status']))}</td>" for s in outs) + "</tr>"
    keys = [("videos", "videos"), ("videos_ok", "ok"), ("videos_partial", "partial"),
            ("videos_error", "error"), ("frames_decoded", "frames"),
            ("hours_of_video", "hours of video"), ("gmacs_dense", "GMACs dense"),
            ("gmacs_run", "GMACs run"), ("savings", "savings"),
            ("savings_after_first_frames", "savings after first frames"),
            ("model_s", "model s"), ("decode_s", "decode s")]
    if any(s["totals"].get("gmacs_padding") for s in outs):  # ragged streams side by side
        at = keys.index(("savings", "savings")) + 1
        keys[at:at] = [("gmacs_padding", "GMACs on padding"),
                       ("savings_with_padding", "savings with padding")]
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(s['label'])}<br>"
                                     f"<small>{html.escape(s['uri'])}</small></th>"
                                     for s in outs) + "</tr>"
    rows += "".join(f"<tr><th>{name}</th>" + "".join(f"<td>{_fmt(s['totals'][k])}</td>"
                                                    for s in outs) + "</tr>"
                   for k, name in keys)
    rows += "<tr><th>parameters</th>" + "".join(
        f"<td>{html.escape(json.dumps(s['params'], sort_keys=True, default=str))}</td>"
        for s in outs) + "</tr>"
    rows += "<tr><th>segments complete</th>" + "".join(
        f"<td>{s['segments']['complete']:,d} / {s['segments']['total']:,d}</td>"
        for s in outs) + "</tr>"
    rows += "<tr><th>GPU-hours saved (est.)</th>" + "".join(
        f"<td>{_fmt(s['estimate']['gpu_hours_saved_est'])}</td>" for s in outs) + "</tr>"
    rows += "<tr><th>CPU-hours saved (est.)</th>" + "".join(
        f"<td>{_fmt(s['estimate']['cpu_hours_saved_est'])}</td>" for s in outs) + "</tr>"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>vidprune report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}"
        "th{background:#f4f4f4}small{font-weight:normal;color:#666}</style></head><body>",
        "<h1>vidprune savings report</h1>",
        f"<p>generated {html.escape(summary['generated_at'])} from the Parquet outputs "
        "(manifest and completed segments).</p>",
        f"<h2>Totals</h2><table>{head}{rows}</table>",
        "<p><b>How device-hours saved are estimated:</b> "
        f"{html.escape(outs[0]['estimate']['how']) if outs else ''}.</p>",
    ]
    for s in outs:
        if "measured_vs_dense" in s:
            m = s["measured_vs_dense"]
            change = (f"{100 * m['time_savings']:.1f}% less" if m["time_savings"] >= 0
                      else f"{-100 * m['time_savings']:.1f}% more: the method's overhead "
                           "outweighs what it skips on this model")
            parts.append(f"<p><b>{html.escape(s['label'])}</b>, measured against the dense "
                         f"run {html.escape(m['dense_output'])} on {m['videos']} video(s): "
                         f"model time {_fmt(m['model_s_pruned'])} s vs "
                         f"{_fmt(m['model_s_dense'])} s ({change}).</p>")
    for name in PLOTS:
        if name in images:
            data = base64.b64encode(images[name]).decode()
            parts.append(f"<p><img alt='{name}' src='data:image/png;base64,{data}'></p>")
    for s in outs:
        parts.append(f"<h2>{html.escape(s['label'])}</h2>")
        d = s["savings_per_video"]
        if d.get("count"):
            parts.append(f"<p>savings per video: mean {100 * d['mean']:.1f}%, p10 "
                         f"{100 * d['p10']:.1f}%, median {100 * d['p50']:.1f}%, p90 "
                         f"{100 * d['p90']:.1f}% ({d['count']} videos)</p>")
        columns = ["segments", "segments_failed", "frames", "gmacs_dense", "gmacs_run",
                   "savings", "model_s", "decode_s", "frames_per_model_s",
                   "frames_per_busy_s"]
        parts.append("<h3>Runs</h3>" + _table(s["runs"], ["job_id", "segments", "frames",
                                                          "span_s", "frames_per_s",
                                                          "actors", "nodes"]))
        parts.append("<h3>Per model and method</h3>"
                     + _table(s["per_model_method"], ["model_method", *columns]))
        parts.append("<h3>Per node</h3>" + _table(s["per_node"], ["node_id", *columns]))
        parts.append("<h3>Per actor</h3>" + _table(s["per_actor"], ["actor_id", *columns]))
        parts.append("<h3>Device estimate</h3>" + _table(
            s["estimate"]["per_device"], ["device", "gmacs_per_model_s", "model_hours",
                                          "dense_model_hours_est", "actor_hours_saved_est"]))
        parts.append("<h3>Failures</h3>" + _table(s["failures"], ["uri", "status", "error"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(outputs: list[Output], target: Location) -> dict[str, Any]:
    """Write ``summary.json``, ``report.html`` and the PNGs under ``target``; returns the
    summary (with ``files``: what was written)."""
    summary = build_summary(outputs)
    images = plots(summary, outputs)
    page = render_html(summary, images)
    files = {"summary.json": json.dumps(summary, indent=2, default=str).encode(),
             "report.html": page.encode(), **images}
    for name, data in files.items():
        target.write_bytes(name, data)
    summary["files"] = [target.uri_for(name) for name in files]
    return summary
