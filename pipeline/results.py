"""From segment rows to one row per video, and the totals a job prints at the end."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from .schemas import VIDEOS, to_table

_SUMMED = ("gmacs_dense", "gmacs_run", "gmacs_overhead", "gmacs_padding", "gmacs_dense_first",
           "gmacs_run_first", "tokens_dense", "tokens_run", "decode_s", "model_s", "wall_s")


def savings(gmacs_dense: float, gmacs_run: float) -> float:
    """``1 - run / dense``; 0 when nothing ran."""
    return 1.0 - gmacs_run / gmacs_dense if gmacs_dense > 0 else 0.0


def _joined(values) -> str | None:
    distinct = sorted({v for v in values if v})
    return ",".join(distinct) if distinct else None


def aggregate_videos(manifest: pa.Table, segments: pa.Table, job: dict[str, Any]) -> pa.Table:
    """One ``VIDEOS`` row per video of ``manifest``.

    ``segments``: the stats rows of the manifest's completed segments. A video is ``ok`` when
    every segment completed without error, ``partial`` when frames were decoded but a segment
    failed or did not complete, ``error`` when no frame was decoded (including videos that
    could not be probed). ``job``: ``task``, ``model``, ``method``, ``params`` (JSON) and
    ``job_id`` (used for videos that never reached an actor).
    """
    done = defaultdict(list)
    for row in segments.to_pylist():
        done[row["segment_id"]].append(row)
    by_video: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in manifest.to_pylist():
        by_video[row["video_id"]].append(row)
    out = []
    for vid, rows in by_video.items():
        rows.sort(key=lambda r: r["segment_index"])
        first = rows[0]
        segs = [done[r["segment_id"]][0] for r in rows if done.get(r["segment_id"])]
        video = {
            "video_id": vid, "uri": first["uri"], "frames_total": first["frames_total"],
            "frames_expected": sum(r["frames_expected"] for r in rows),
            "frames_decoded": sum(s["frames_decoded"] for s in segs),
            "duration_s": first["duration_s"], "fps": first["fps"], "width": first["width"],
            "height": first["height"], "size_bytes": first["size_bytes"],
            "segments": first["segments_total"], "task": job["task"], "model": job["model"],
            "method": job["method"], "params": job["params"],
        }
        for key in _SUMMED:  # null: a segment written before its column existed
            video[key] = float(sum(s.get(key) or 0.0 for s in segs))
        video["savings"] = savings(video["gmacs_dense"], video["gmacs_run"])
        errors = []
        if first["probe_error"]:
            errors.append(first["probe_error"])
        if first.get("probe_warning"):
            errors.append(first["probe_warning"])
        many = len(rows) > 1
        for s in segs:
            if s["error"]:
                errors.append(f"segment {s['segment_index']}: {s['error']}" if many
                              else s["error"])
        missing = len(rows) - len(segs) if not first["probe_error"] else 0
        if missing:
            errors.append(f"{missing} of {len(rows)} segment(s) did not complete")
        if not errors:
            status = "ok"
        else:
            status = "partial" if video["frames_decoded"] > 0 else "error"
        last = max(segs, key=lambda s: s["finished_at"]) if segs else None
        video.update({
            "status": status, "error": "; ".join(errors)[:2000] if errors else None,
            "node_id": _joined(s["node_id"] for s in segs),
            "actor_id": _joined(s["actor_id"] for s in segs),
            "device": _joined(s["device"] for s in segs),
            "started_at": min((s["started_at"] for s in segs), default=None),
            "finished_at": last["finished_at"] if last else None,
            "job_id": last["job_id"] if last else job["job_id"],
        })
        out.append(video)
    out.sort(key=lambda v: v["uri"])
    return to_table(out, VIDEOS)


def totals(videos: pa.Table) -> dict[str, Any]:
    """Job totals from the videos table (what ``job.json`` and the summary show)."""
    rows = videos.to_pylist()
    count = {status: sum(1 for v in rows if v["status"] == status)
             for status in ("ok", "partial", "error")}
    dense = float(sum(v["gmacs_dense"] for v in rows))
    run = float(sum(v["gmacs_run"] for v in rows))
    padding = float(sum(v.get("gmacs_padding") or 0.0 for v in rows))
    return {
        "videos": len(rows), **{f"videos_{k}": n for k, n in count.items()},
        "frames_decoded": int(sum(v["frames_decoded"] for v in rows)),
        "hours_of_video": float(sum(v["duration_s"] for v in rows)) / 3600.0,
        "gmacs_dense": dense, "gmacs_run": run, "savings": savings(dense, run),
        # executed on the padding of ragged lockstep batches, outside gmacs_run
        "gmacs_padding": padding, "savings_with_padding": savings(dense, run + padding),
        "decode_s": float(sum(v["decode_s"] for v in rows)),
        "model_s": float(sum(v["model_s"] for v in rows)),
    }


def format_summary(t: dict[str, Any], wall_s: float, output_uri: str,
                   errors: list[tuple[str, str]] = ()) -> str:
    """The table printed at the end of a job."""
    lines = [
        f"videos       {t['videos']:>10,d}   ok {t['videos_ok']:,d} · partial "
        f"{t['videos_partial']:,d} · error {t['videos_error']:,d}",
        f"frames       {t['frames_decoded']:>10,d}   ({t['hours_of_video']:.3f} h of video)",
        f"GMACs dense  {t['gmacs_dense']:>10,.1f}",
        f"GMACs run    {t['gmacs_run']:>10,.1f}   savings {100 * t['savings']:.1f}%",
    ]
    if t.get("gmacs_padding"):
        lines.append(f"GMACs pad    {t['gmacs_padding']:>10,.1f}   on padding of ragged streams "
                     f"run side by side; savings with it "
                     f"{100 * t['savings_with_padding']:.1f}%")
    lines += [
        f"time         {wall_s:>10.1f} s (decode {t['decode_s']:.1f} s, model "
        f"{t['model_s']:.1f} s, summed over actors)",
        f"outputs      {output_uri}",
    ]
    if errors:
        lines.append("problems:")
        for uri, error in list(errors)[:10]:
            lines.append(f"  {uri}: {error}")
        if len(errors) > 10:
            lines.append(f"  ... and {len(errors) - 10} more (see videos/videos.parquet)")
    return "\n".join(lines)
