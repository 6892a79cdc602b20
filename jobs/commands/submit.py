"""``vidprune submit job.yaml --address http://HEAD:8265 [--wait]``: run a job on a Ray
cluster through the Ray Jobs API (see ``jobs/submit.py``)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from ..options import add_dashboard_address

    p = sub.add_parser(
        "submit", help="submit a job to a Ray cluster (Ray Jobs API)",
        description="Validate the job spec here, then submit it to a Ray cluster with "
                    "vidprune's code and the spec; S3 settings and credentials (AWS_*) are "
                    "forwarded from this environment unless --credentials cluster. The "
                    "submission id is vidprune-<name>-<attempt>; a job that is still "
                    "running is not submitted twice. See docs/CLUSTER.md.")
    p.add_argument("spec", help="the job spec (YAML)")
    add_dashboard_address(p)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a spec key (values are YAML)")
    p.add_argument("--credentials", choices=("env", "cluster"), default="env",
                   help="env: forward AWS_* from this environment (default); cluster: the "
                        "cluster's nodes have their own (a Secret, an instance role)")
    p.add_argument("--wait", action="store_true",
                   help="follow the job's log until it ends; exit with its result")
    p.set_defaults(func=main)


def main(args) -> int:
    from .. import submit
    from ..spec import load_spec

    spec, notes = load_spec(args.spec, args.overrides)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    done = submit.submit(spec, args.address, credentials=args.credentials)
    forwarded = ", ".join(done.forwarded) or "none"
    print(f"submitted {done.submission_id} (job {done.name}, attempt {done.attempt}); "
          f"forwarded from this environment: {forwarded}")
    if not args.wait:
        print(f"follow it with: vidprune logs {done.submission_id} --follow")
        return 0
    client = submit.connect(args.address)
    job = submit.wait(client, done.submission_id, write=submit.write_out)
    print(f"\n{done.submission_id}: {job.status}")
    return submit.status_code(job)
