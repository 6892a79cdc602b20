"""Locations on local disks and on the S3 server: atomic writes, listings, no secrets."""

import os
import pickle

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
