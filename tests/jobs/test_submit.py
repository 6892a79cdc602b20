"""Submission without a cluster: ids, addresses, what is forwarded, the staged spec, exit
codes; and a bad spec or an unreachable cluster refused before anything is submitted. (The
submission itself, on a real cluster: tests/cluster.)"""

import yaml

from jobs import submit
from jobs.cli import main
from jobs.errors import UserError
from jobs.spec import load_spec


def test_submission_ids_name_the_job_and_its_attempt():
    for name in ("nightly", "run-2", "a.b_c-9", "x"):
        for attempt in (1, 12):
            assert submit.parse_submission_id(submit.submission_id(name, attempt)) == (
                name, attempt)
    assert submit.submission_id("run-2", 3) == "vidprune-run-2-3"
    assert submit.parse_submission_id("raysubmit_XYZ") is None
    assert submit.parse_submission_id("vidprune-nightly") is None
    assert submit.parse_submission_id(None) is None


def test_the_dashboard_address():
    env = {"RAY_API_SERVER_ADDRESS": "http://env:8265", "RAY_ADDRESS": "http://other:8265"}
    assert submit.dashboard_address("http://head:8265/", env) == "http://head:8265"
    assert submit.dashboard_address("head:8265", {}) == "http://head:8265"
    assert submit.dashboard_address(None, env) == "http://env:8265"
    assert submit.dashboard_address(None, {"RAY_ADDRESS": "https://x:443"}) == "https://x:443"
    for bad in ("ray://head:10001", "auto"):
        try:
            submit.dashboard_address(bad, {})
        except UserError as exc:
            assert "http://HEAD:8265" in str(exc)
        else:
            raise AssertionError(bad)
    try:
        submit.dashboard_address(None, {})
    except UserError as exc:
        assert "--address" in str(exc)
    else:
        raise AssertionError("no address accepted")


def test_only_s3_settings_are_forwarded():
    env = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "eu",
           "AWS_SESSION_TOKEN": "", "AWS_PROFILE": "mine", "HOME": "/root", "PATH": "/bin"}
    assert submit.forwarded_env(env) == {"AWS_ACCESS_KEY_ID": "id",
                                         "AWS_SECRET_ACCESS_KEY": "secret",
                                         "AWS_REGION": "eu"}


def test_the_staged_spec_is_the_validated_spec(tmp_path, tiny_detector):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": {"uri": "s3://archive/videos/"},
                                    "model": tiny_detector,
                                    "output": {"uri": "s3://runs/nightly/"}}))
    spec, _ = load_spec(path, ["pruning.method=none", "resources.actors=3"])
    (tmp_path / "stage").mkdir()
    staged = submit.stage_spec(spec, tmp_path / "stage")
    assert staged.name == "job.yaml"
    again, _ = load_spec(staged)
    assert again.as_dict() == spec.as_dict()
    assert again.name == "videos" and again.resources.actors == 3
    assert again.pruning.method == "none"


def test_exit_codes_of_finished_jobs():
    from ray.dashboard.modules.job.pydantic_models import JobDetails
    from ray.job_submission import JobStatus

    def job(status, code=None):
        return JobDetails(type="SUBMISSION", status=status, entrypoint="x",
                          driver_exit_code=code)

    assert submit.status_code(job(JobStatus.SUCCEEDED, 0)) == 0
    assert submit.status_code(job(JobStatus.FAILED, 2)) == 2   # the job's own exit code
    assert submit.status_code(job(JobStatus.FAILED)) == 1
    assert submit.status_code(job(JobStatus.STOPPED)) == 1
    lines = submit.describe(job(JobStatus.FAILED, 1))
    assert lines[0].endswith("FAILED") and "exit code   1" in "\n".join(lines)


def test_nothing_is_submitted_for_a_bad_spec_or_an_unreachable_cluster(tmp_path, capsys,
                                                                       tiny_detector):
    from tests.conftest import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"input": {"uri": "/v"}, "output": {"uri": "/o"},
                                   "resources": {"actors": 0}}))
    assert main(["submit", str(bad), "--address", nowhere]) == 2
    err = capsys.readouterr().err
    assert "resources.actors" in err and "cannot reach" not in err  # refused before

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"input": {"uri": "/v"}, "output": {"uri": "/o"},
                                    "model": tiny_detector}))
    assert main(["submit", str(good), "--address", nowhere]) == 2
    assert "cannot reach the Ray Jobs API at " + nowhere in capsys.readouterr().err
    for command in (["status", "x"], ["logs", "x"], ["stop", "x"]):
        assert main([*command, "--address", nowhere]) == 2
        assert "cannot reach" in capsys.readouterr().err
