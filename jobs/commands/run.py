"""``vidprune run job.yaml [--set key=value ...]``: the main job, on a laptop or a cluster."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="annotate a folder or S3 prefix of videos (the main job)",
        description="Annotate every video under input.uri with a (token-pruned) model on Ray "
                    "Data; write annotations and per-video compute statistics as Parquet "
                    "under output.uri. See docs/SPEC.md for the job spec.")
    p.add_argument("spec", help="the job spec (YAML)")
    add_job_options(p)
    p.set_defaults(func=main)


def add_job_options(p, dry_run_help: str = "check the spec, the model, the input and the "
                                           "output; write nothing") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set pruning.method=none "
                        "--set resources.actors=4 (values are YAML)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on, HOST:PORT of its head, from a machine of the "
                        "cluster (default: $RAY_ADDRESS, else Ray starts in this process); "
                        "Ray Client (ray://) is refused: use vidprune submit")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)


def main(args) -> int:
    from ..spec import load_spec

    spec, notes = load_spec(args.spec, args.overrides)
    return run_spec(spec, notes, address=args.address, dry_run=args.dry_run)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """``vidprune stop``, Ray's job stop and Kubernetes end a driver with SIGTERM: handle it
    as Ctrl-C while the job runs, so it records itself as interrupted in job.json."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt("stopped (SIGTERM: vidprune stop, Ray's job stop or the "
                                "platform)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_spec(spec: Any, notes: list[str] = (), address: str | None = None,
             dry_run: bool = False) -> int:
    """Run a validated spec and print its summary; the exit code (see ``jobs/cli.py``)."""
    from pipeline.job import JobRefused, plan_job, run_job

    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    target = address or os.environ.get("RAY_ADDRESS") or ""
    if target.startswith("ray://"):
        raise UserError(
            f"--address {target}: Ray Client cannot run a job's Ray Data pipeline (its "
            "executor needs a driver inside the cluster, which a ray:// connection is not); "
            "submit the job instead: vidprune submit SPEC --address http://HEAD:8265, or run "
            "vidprune run on a machine of the cluster with --address HEAD:6379")
    try:
        if dry_run:
            plan = plan_job(spec)
            print(f"{spec.name}: {len(plan.videos)} video(s) under {spec.input.uri}; model "
                  f"{plan.model_label} ({plan.task}), method {plan.method} "
                  f"{plan.params}; output {spec.output.uri} (mode {spec.output.mode}"
                  f"{', resuming' if plan.previous else ''}). Nothing was written.")
            return 0
        with _sigterm_as_interrupt():
            result = run_job(spec, address=address)
    except JobRefused as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        traceback.print_exc()
        print(f"vidprune: the job failed: {exc}\n(what completed is kept; run the same spec "
              "again with output.mode resume to continue)", file=sys.stderr)
        return 1
    print(f"\n{spec.name}: job {result.job_id} {result.status}; {result.segments_run} "
          f"segment(s) run, {result.segments_skipped} already complete\n")
    print(result.summary)
    t = result.totals
    # Every video failing usually means a setup problem (credentials on the workers, a codec
    # missing): say so with the exit code, not only in the table.
    return 1 if t["videos"] and t["videos_error"] == t["videos"] else 0
