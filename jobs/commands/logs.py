"""``vidprune logs ID [--follow]``: the driver's log of a submitted job."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..options import add_dashboard_address

    p = sub.add_parser(
        "logs", help="the log of a submitted job",
        description="Print the log of a submitted job (its driver: progress and summary). "
                    "ID is a submission id or a job name (its latest attempt).")
    p.add_argument("id", help="submission id or job name")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing until the job ends")
    add_dashboard_address(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from .. import submit

    client = submit.connect(args.address)
    job = submit.find(client, args.id)
    if args.follow:
        submit.follow_logs(client, job.submission_id, submit.write_out)
    else:
        submit.write_out(client.get_job_logs(job.submission_id))
    return 0
