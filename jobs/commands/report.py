"""``vidprune report OUTPUT_URI [OUTPUT_URI ...]``: the savings report of job outputs."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="the savings report of one or more job outputs",
        description="Read job outputs (local folders or s3:// prefixes) and write "
                    "summary.json, report.html (self-contained) and PNG plots: totals, "
                    "savings, estimated GPU-hours saved, per node, actor, model and method, "
                    "failures. Several outputs are compared side by side. Works on a job "
                    "that is still running or died: it reports what is complete.")
    p.add_argument("outputs", nargs="+", metavar="OUTPUT_URI", help="job output locations")
    p.add_argument("--out", default=None,
                   help="where to write the report (default: OUTPUT_URI/report for one "
                        "output, ./vidprune-report for several)")
    p.add_argument("--html", default=None, metavar="PATH",
                   help="also write the HTML page to this local file (a file name, not "
                        "a folder)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint of the outputs (as storage.endpoint_url)")
    p.add_argument("--region", default=None, help="the bucket's region, when needed")
    p.set_defaults(func=main)


def main(args) -> int:
    from pathlib import Path

    from operators.retry import give_up_when_unreachable
    from pipeline.report import REPORT_DIR, load_output, write_report
    from pipeline.storage import (LocalFileSystem, Location, StorageError, is_local,
                                  local_write_problem, s3_bucket_problem, write_problem)

    from ..errors import UserError
    from ..spec import _check_uri

    storage = {"endpoint_url": args.endpoint_url, "region": args.region}
    outputs = []
    for uri in args.outputs:
        try:
            location = Location.open(_check_uri(uri), **storage)
            with give_up_when_unreachable():  # someone waits: a wrong endpoint fails fast
                outputs.append(load_output(location))
        except (StorageError, OSError, ValueError) as exc:
            raise UserError(f"cannot read the output {uri}: "
                            f"{' '.join(str(exc).split())[:500]}") from None
    html = _html_target(args.html) if args.html else None
    if args.out:
        try:
            target = Location.open(_check_uri(args.out), **storage)
        except (StorageError, ValueError) as exc:
            raise UserError(f"--out {args.out}: {exc}") from None
    elif len(outputs) == 1:
        target = Location(outputs[0].location.fs,
                          outputs[0].location.path(REPORT_DIR),
                          outputs[0].location.uri_for(REPORT_DIR))
    else:
        target = Location.open(str(Path("vidprune-report").resolve()))
    elsewhere = "; choose another --out" if args.out else \
        "; use --out to write it somewhere else"
    # Checked before anything is written (reads only): the report lands whole or not at all.
    problem = (local_write_problem(target.root) if is_local(target.fs)
               else s3_bucket_problem(target.fs, target.root))
    if problem:
        raise UserError(f"cannot write the report to {target.uri}: {problem}{elsewhere}")
    try:
        summary = write_report(outputs, target)
    except OSError as exc:
        raise UserError(f"cannot write the report to {target.uri}: "
                        f"{write_problem(exc, target.fs, target.path('summary.json'))}"
                        f"{elsewhere}") from None
    if html is not None:
        try:
            html.parent.mkdir(parents=True, exist_ok=True)
            html.write_bytes(target.read_bytes("report.html"))
        except OSError as exc:
            raise UserError(f"cannot write the HTML page to {args.html}: "
                            f"{write_problem(exc, LocalFileSystem(), str(html))} (the report "
                            f"itself is in {target.uri})") from None
    for s in summary["outputs"]:
        t = s["totals"]
        padded = (f" ({100 * t['savings_with_padding']:.1f}% with the padding of ragged "
                  f"batches)" if t.get("gmacs_padding") else "")
        print(f"{s['label']}: {t['videos']:,d} videos ({t['videos_ok']:,d} ok), "
              f"{t['frames_decoded']:,d} frames, {t['hours_of_video']:.3f} h of video, "
              f"savings {100 * t['savings']:.1f}%{padded}, est. GPU-hours saved "
              f"{s['estimate']['gpu_hours_saved_est']:.3g}, CPU-hours saved "
              f"{s['estimate']['cpu_hours_saved_est']:.3g}; segments "
              f"{s['segments']['complete']}/{s['segments']['total']} complete")
    print(f"report: {target.uri_for('report.html')} (and summary.json, "
          f"{len(summary['files']) - 2} plots)" + (f"; the page also at {html}" if html else ""))
    return 0


def _html_target(path: str):
    """The local file ``--html`` names, checked before anything is written (reads only)."""
    from pathlib import Path

    from pipeline.storage import local_write_problem

    from ..errors import UserError

    html = Path(path).expanduser().absolute()
    problem = (f"{path} is a folder; name a file, such as {html / 'report.html'}"
               if html.is_dir() else local_write_problem(str(html.parent)))
    if problem:
        raise UserError(f"cannot write the HTML page to {path}: {problem}")
    return html
