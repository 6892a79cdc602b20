"""``vidprune status ID``: where a submitted job stands (Ray's status, and the segments
complete in its output when the output is readable from here)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..options import add_dashboard_address

    p = sub.add_parser(
        "status", help="the status of a submitted job",
        description="Show a submitted job's status: ID is a submission id "
                    "(vidprune-<name>-<attempt>) or a job name (its latest attempt); "
                    "without ID, every vidprune job on the cluster.")
    p.add_argument("id", nargs="?", default=None, help="submission id or job name")
    add_dashboard_address(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from .. import submit

    client = submit.connect(args.address)
    if args.id is None:
        jobs = submit.vidprune_jobs(client)
        if not jobs:
            print("no vidprune jobs on this cluster")
        for job in jobs:
            print(f"{job.submission_id:40s} {job.status}")
        return 0
    for line in submit.describe(submit.find(client, args.id)):
        print(line)
    return 0
