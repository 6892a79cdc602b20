"""Locations on local disks and on the S3 server: atomic writes, listings, no secrets."""

import os
import pickle

import pytest
import yaml

from pipeline.storage import Location, filesystem, identity, write_atomic


def test_local_writes_are_atomic_and_leave_no_temporaries(tmp_path):
    fs, path = filesystem(str(tmp_path / "out" / "x.bin"))
    write_atomic(fs, path, b"first")
    write_atomic(fs, path, b"second")
    assert (tmp_path / "out" / "x.bin").read_bytes() == b"second"
    assert os.listdir(tmp_path / "out") == ["x.bin"]


def test_location_on_s3(s3):
    loc = Location.open("s3://runs/nightly/", endpoint_url=s3.endpoint_url)
    loc.fs.mkdir("runs")
    assert loc.root == "runs/nightly" and loc.entries() == [] and not loc.exists()
    loc.write_bytes("segments/a.parquet", b"1")
    loc.write_bytes("segments/b.parquet", b"2")
    loc.write_bytes("job.json", b"{}")
    assert loc.entries() == ["job.json", "segments"]
    assert loc.files("segments") == ["a.parquet", "b.parquet"]
    assert loc.read_bytes("segments/b.parquet") == b"2"
    assert loc.uri_for("job.json") == "s3://runs/nightly/job.json"
    loc.remove_files("segments", ["a.parquet"])
    assert loc.files("segments") == ["b.parquet"]
    loc.remove("segments")
    assert loc.entries() == ["job.json"]
    assert identity(loc.fs.info(loc.path("job.json"))).startswith("etag:")


def test_a_pickled_filesystem_carries_no_credentials(s3):
    fs, _ = filesystem("s3://bucket/x", endpoint_url=s3.endpoint_url)
    blob = pickle.dumps(fs)
    assert s3.env["AWS_SECRET_ACCESS_KEY"].encode() not in blob
    assert s3.env["AWS_ACCESS_KEY_ID"].encode() not in blob


def _no_credentials(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # a CI host's instance role
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def _cli(argv):
    from jobs.cli import main

    return main(argv)


@pytest.mark.parametrize("where", ["output", "input"])
def test_missing_credentials_fail_at_once_with_a_hint(s3, monkeypatch, tmp_path, capsys, where):
    """No retry brings credentials: the default 6 attempts would wait about 15 s."""
    loc = Location.open("s3://videos/v/", endpoint_url=s3.endpoint_url)
    loc.fs.mkdir("videos")
    loc.write_bytes("a.mp4", b"not read")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"not read")
    s3_uri = "s3://videos/v/" if where == "input" else "s3://videos/out/"
    local = str(tmp_path / ("videos" if where == "output" else "out"))
    spec = {"input": {"uri": s3_uri if where == "input" else local,
                      "storage": {"endpoint_url": s3.endpoint_url}},
            "output": {"uri": s3_uri if where == "output" else local}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    _no_credentials(monkeypatch)
    assert _cli(["run", str(tmp_path / "job.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{where}.uri: " in err and "Traceback" not in err and "times" not in err
    assert "NoCredentialsError: Unable to locate credentials" in err
    assert "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in err and "storage.anon" in err

    with pytest.raises(PermissionError, match="Unable to locate credentials; set AWS_") as got:
        Location.open("s3://videos/v/", endpoint_url=s3.endpoint_url).read_bytes("a.mp4")
    assert "times" not in str(got.value)  # one attempt: not retried


def test_an_endpoint_that_never_answers_is_named_in_the_error(monkeypatch):
    """A closed port, met mid-job (a driver's write, an actor's read): retried as a
    transient fault, then the hint to check the endpoint."""
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off
    monkeypatch.setenv("VIDPRUNE_STORAGE_ATTEMPTS", "2")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(OSError) as got:
        Location.open("s3://runs/r1/", endpoint_url=endpoint).read_bytes("job.json")
    assert "reading s3://runs/r1/job.json failed 2 times; last error: EndpointConnection" in \
        str(got.value)
    assert "the endpoint never answered: check --endpoint-url / storage.endpoint_url" in \
        str(got.value)


def test_a_job_or_report_gives_up_at_once_on_an_endpoint_that_never_answers(
        monkeypatch, capsys, tmp_path):
    """A wrong endpoint is a user's mistake far more often than an outage: planning and
    `report` give up after one attempt (botocore's own retries included) instead of six,
    which took over a minute; the message says what to check."""
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("VIDPRUNE_STORAGE_ATTEMPTS", raising=False)  # the default, 6
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spec = {"input": {"uri": "s3://videos/v/", "storage": {"endpoint_url": endpoint}},
            "output": {"uri": str(tmp_path / "out")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert _cli(["run", str(tmp_path / "job.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "input.uri: listing s3://videos/v failed once; last error: EndpointConnect" in err
    assert "the endpoint never answered" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert _cli(["report", "s3://runs/r1/", "--endpoint-url", endpoint]) == 2
    err = capsys.readouterr().err
    assert "reading s3://runs/r1/job.json failed once; last error: EndpointConnection" in err
