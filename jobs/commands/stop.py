"""``vidprune stop ID``: stop a submitted job. What completed is kept; submitting the same
spec again (output mode resume) continues it."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..options import add_dashboard_address

    p = sub.add_parser(
        "stop", help="stop a submitted job",
        description="Stop a submitted job (Ray sends its driver SIGTERM, then SIGKILL). "
                    "Completed segments are kept: submit the spec again to continue.")
    p.add_argument("id", help="submission id or job name (its latest attempt)")
    add_dashboard_address(p)
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the job to stop (default 60)")
    p.set_defaults(func=main)


def main(args) -> int:
    from .. import submit
    from ..errors import UserError

    client = submit.connect(args.address)
    job = submit.find(client, args.id)
    if str(job.status) not in submit.ACTIVE:
        print(f"{job.submission_id} is not running ({job.status})")
        return 0
    client.stop_job(job.submission_id)
    job = submit.wait(client, job.submission_id, timeout_s=args.timeout)
    if str(job.status) in submit.ACTIVE:
        raise UserError(f"{job.submission_id} is still {job.status} after "
                        f"{args.timeout:.0f} s")
    print(f"{job.submission_id}: {job.status}")
    return 0
