"""Submitting jobs to a Ray cluster through the Ray Jobs API (the dashboard's HTTP port).

``vidprune submit job.yaml --address http://HEAD:8265`` validates the spec here (a bad spec
never reaches the cluster), then submits ``python -m jobs.cli run job.yaml`` with a runtime
environment that carries everything the job needs:

- the project's packages (``py_modules``), so the cluster runs exactly the submitter's code
  (its nodes need only the dependencies: the image in ``deploy/``);
- the spec as validated, ``--set`` overrides applied and defaults filled in, as the
  ``working_dir`` (one file, ``job.yaml``);
- the submitter's S3 settings and credentials (``AWS_*``, see :data:`FORWARDED_ENV`) as
  ``env_vars``, unless ``credentials="cluster"`` (the nodes have their own). They are never
  written into the spec, the outputs or vidprune's own output. Where Ray itself keeps them
  is documented in docs/CLUSTER.md ("Credentials").

Submission ids are ``vidprune-<name>-<attempt>``. Ray refuses a second submission with an
id it has seen, even after that job ended, so each run of a job gets the next attempt
number; a submission while an attempt is still pending or running is refused (the same job
twice would do the same work twice). Two submitters racing for the same attempt number are
separated by Ray itself: the second one's id is refused.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .errors import UserError

#: Variables forwarded from the submitter's environment to the job: S3 credentials, region
#: and endpoint (what s3fs/botocore read). ``AWS_PROFILE`` is not among them: it names a
#: profile in the submitter's own ``~/.aws`` files, which the cluster does not have.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
SPEC_FILE = "job.yaml"
ENTRYPOINT = f"python -m jobs.cli run {SPEC_FILE}"
ID_PREFIX = "vidprune-"
_ID = re.compile(rf"^{ID_PREFIX}(?P<name>.+)-(?P<attempt>[0-9]+)$")
#: Metadata keys set on every submission (plain settings, never secrets).
META_NAME, META_ATTEMPT, META_OUTPUT = "vidprune.name", "vidprune.attempt", "vidprune.output"
ACTIVE = ("PENDING", "RUNNING")

Print = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def write_out(chunk: str) -> None:
    """A chunk of a job's log, to stdout as it comes."""
    sys.stdout.write(chunk)
    sys.stdout.flush()


def submission_id(name: str, attempt: int) -> str:
    return f"{ID_PREFIX}{name}-{attempt}"


def parse_submission_id(sid: str | None) -> tuple[str, int] | None:
    """``vidprune-nightly-3`` -> ``("nightly", 3)``; None for ids vidprune did not make."""
    m = _ID.match(sid or "")
    return (m.group("name"), int(m.group("attempt"))) if m else None


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of :data:`FORWARDED_ENV` that are set in ``environ``."""
    return {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}


def dashboard_address(address: str | None, environ: Mapping[str, str]) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else an http(s) ``RAY_ADDRESS``."""
    for candidate in (address, environ.get("RAY_API_SERVER_ADDRESS"),
                      environ.get("RAY_ADDRESS")):
        if candidate:
            candidate = candidate.rstrip("/")
            if not re.match(r"^https?://", candidate):
                if candidate.startswith("ray://") or candidate == "auto":
                    raise UserError(f"--address {candidate}: vidprune submit talks to the Ray "
                                    "dashboard (Jobs API): give its HTTP address, e.g. "
                                    "http://HEAD:8265")
                candidate = f"http://{candidate}"
            return candidate
    raise UserError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard), "
                    "or set RAY_API_SERVER_ADDRESS")


def connect(address: str | None, environ: Mapping[str, str] | None = None):
    """A ``JobSubmissionClient`` for the cluster (a UserError when it cannot be reached)."""
    import os

    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address, os.environ if environ is None else environ)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # ConnectionError, auth errors, version mismatches
        raise UserError(f"cannot reach the Ray Jobs API at {url}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())[:500]


def vidprune_jobs(client, name: str | None = None) -> list[Any]:
    """The cluster's vidprune submissions (of job ``name``), oldest attempt first."""
    out = []
    for job in client.list_jobs():
        parsed = parse_submission_id(job.submission_id)
        if parsed and (name is None or parsed[0] == name):
            out.append((parsed[1], job))
    return [job for _, job in sorted(out, key=lambda p: p[0])]


@dataclass
class Submission:
    submission_id: str
    name: str
    attempt: int
    forwarded: list[str]     # names of the variables forwarded (never their values)


def stage_spec(spec: Any, folder: Path) -> Path:
    """Write the validated spec (defaults filled in) as the job's ``job.yaml``; it must
    load back to the same spec, or the cluster would run something else."""
    from .spec import validate_spec

    data = spec.as_dict()
    path = folder / SPEC_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    again = validate_spec(yaml.safe_load(path.read_text())).as_dict()
    if again != data:  # pragma: no cover - a bug in the spec's serialisation
        raise RuntimeError("the staged spec does not load back to the same spec")
    return path


def submit(spec: Any, address: str | None, credentials: str = "env",
           environ: Mapping[str, str] | None = None, log: Print = _stderr) -> Submission:
    """Submit a validated spec (see the module docstring); returns what was submitted."""
    import os

    from pipeline.cluster import PACKAGES

    environ = os.environ if environ is None else environ
    client = connect(address, environ)
    name = spec.name
    earlier = vidprune_jobs(client, name)
    active = [j for j in earlier if str(j.status) in ACTIVE]
    if active:
        raise UserError(f"job {name!r} is already {str(active[-1].status).lower()} on this "
                        f"cluster as {active[-1].submission_id}; wait for it "
                        f"(vidprune logs {active[-1].submission_id} --follow) or stop it "
                        f"(vidprune stop {active[-1].submission_id}) before submitting it "
                        "again")
    attempt = 1 + max((parse_submission_id(j.submission_id)[1] for j in earlier), default=0)
    sid = submission_id(name, attempt)

    env = forwarded_env(environ) if credentials == "env" else {}
    if credentials == "env" and environ.get("AWS_PROFILE") and not env.get(
            "AWS_SECRET_ACCESS_KEY"):
        log("note: AWS_PROFILE names a profile of this machine, which the cluster does not "
            "have; export the keys themselves, or run with --credentials cluster when the "
            "nodes have their own")
    for key, where in (("input.uri", spec.input.uri), ("output.uri", spec.output.uri),
                       ("model.checkpoint", spec.model.checkpoint)):
        if where and "://" not in where:
            log(f"note: {key} is a local path ({where}): every node of the cluster must see "
                "it at that path (a shared file system)")

    import importlib

    modules = [str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES]
    output = {"uri": spec.output.uri, "storage": spec.output.storage.options()}
    with tempfile.TemporaryDirectory(prefix="vidprune-submit-") as folder:
        stage_spec(spec, Path(folder))
        runtime_env: dict[str, Any] = {
            "working_dir": folder,
            "py_modules": modules,
            "excludes": ["__pycache__", "*.pyc"],
        }
        if env:
            runtime_env["env_vars"] = env
        try:
            got = client.submit_job(
                entrypoint=ENTRYPOINT, submission_id=sid, runtime_env=runtime_env,
                metadata={META_NAME: name, META_ATTEMPT: str(attempt),
                          META_OUTPUT: json.dumps(output)})
        except Exception as exc:
            text = _one_line(exc)
            if "already exists" in text or "already been used" in text:
                raise UserError(f"{sid} was submitted by someone else a moment ago; "
                                f"vidprune status {name}") from None
            raise UserError(f"the cluster refused the submission: {text}") from None
    return Submission(got, name, attempt, sorted(env))


def find(client, id_or_name: str):
    """The job a user names: a submission id, or a vidprune job name (its latest attempt)."""
    try:
        return client.get_job_info(id_or_name)
    except Exception as exc:
        if "does not exist" not in str(exc) and "404" not in str(exc) and \
                "not found" not in str(exc).lower():
            raise UserError(f"cannot ask the cluster about {id_or_name}: {_one_line(exc)}") \
                from None
    attempts = vidprune_jobs(client, id_or_name)
    if not attempts:
        raise UserError(f"no job {id_or_name!r} on this cluster (give a submission id such "
                        f"as {submission_id(id_or_name, 1)}, or a vidprune job name)")
    return attempts[-1]


def status_code(job) -> int:
    """The exit code ``vidprune submit --wait`` returns for a finished job: 0 when it
    succeeded, the driver's own exit code when it failed with one, else 1."""
    status = str(job.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(job, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def follow_logs(client, sid: str, write: Callable[[str], None]) -> None:
    """Stream the job's log until it ends (or the stream breaks)."""
    async def tail():
        async for chunk in client.tail_job_logs(sid):
            write(chunk)

    asyncio.run(tail())


def wait(client, sid: str, write: Callable[[str], None] | None = None,
         poll_s: float = 1.0, timeout_s: float | None = None):
    """Wait until the job is in a terminal state, streaming its log through ``write``
    when given; returns its final details."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if write is not None:
        try:
            follow_logs(client, sid, write)
        except Exception as exc:  # the log stream broke: keep waiting on the status
            _stderr(f"note: the log stream ended early ({_one_line(exc)}); waiting for the "
                    "job's status")
    while True:
        job = client.get_job_info(sid)
        if str(job.status) not in ACTIVE:
            return job
        if deadline is not None and time.monotonic() > deadline:
            return job
        time.sleep(poll_s)


def output_progress(job) -> str | None:
    """Segments complete / in the manifest, read from the job's output (when reachable
    from here): the Ray status alone does not say how far a job is."""
    meta = job.metadata or {}
    if META_OUTPUT not in meta:
        return None
    try:
        from pipeline.outputs import JOB_FILE, completed_segments, read_manifest
        from pipeline.storage import Location

        output = json.loads(meta[META_OUTPUT])
        location = Location.open(output["uri"], **output.get("storage", {}))
        doc = json.loads(location.read_bytes(JOB_FILE))
        line = f"{output['uri']}: job.json says {doc.get('status')} (job {doc.get('job_id')})"
        try:
            manifest = read_manifest(location)
        except (OSError, ValueError):
            return line + "; no manifest yet"
        ids = set(manifest.column("segment_id").to_pylist())
        done = len(completed_segments(location) & ids)
        return line + f"; {done}/{len(ids)} segment(s) complete"
    except Exception as exc:  # progress is a bonus: never fail the status on it
        return f"(output not readable from here: {_one_line(exc)[:200]})"


def describe(job) -> list[str]:
    """Lines for ``vidprune status`` (never the runtime environment: it holds secrets)."""
    def when(ms):
        if not ms:
            return "-"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))

    lines = [f"{job.submission_id}  {job.status}"]
    meta = job.metadata or {}
    if META_NAME in meta:
        lines.append(f"  job         {meta[META_NAME]} (attempt {meta.get(META_ATTEMPT)})")
    lines.append(f"  started     {when(job.start_time)}")
    lines.append(f"  ended       {when(job.end_time)}")
    if job.driver_exit_code is not None:
        lines.append(f"  exit code   {job.driver_exit_code}")
    if job.message:
        lines.append(f"  message     {' '.join(job.message.split())[:500]}")
    progress = output_progress(job)
    if progress:
        lines.append(f"  output      {progress}")
    return lines
