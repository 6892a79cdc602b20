"""Transient storage errors: output writes and the range proxy's reads are retried with
backoff against a store that really fails (an HTTP front on the S3 server answering some
requests with S3 error replies); what keeps failing ends as a segment error row (reads) or
an error that leaves the segment unmarked (writes), never as a half-written result."""

import pytest

import operators.proxy as proxy_module
from operators.annotator import AnnotatorActor
from operators.proxy import RangeProxy
from operators.retry import (Backoff, CredentialsError, RetriesExhausted,
                             give_up_when_unreachable, is_transient, retry)
from pipeline.manifest import build_manifest
from pipeline.outputs import SegmentWriter, completed_segments, read_segments
from pipeline.storage import Location, filesystem
from tests.faults import FlakyFront


@pytest.fixture
def front(s3, monkeypatch):
    # botocore's own retries off, so that every injected failure reaches vidprune's layer;
    # four attempts there.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("VIDPRUNE_STORAGE_ATTEMPTS", "4")
    f = FlakyFront(s3.port)
    yield f
    f.close()


def test_what_is_retried():
    assert is_transient(OSError(5, "Internal error")) and is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    for exc in (FileNotFoundError(), PermissionError(), ValueError(), KeyError()):
        assert not is_transient(exc)
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry(flaky, "x", Backoff(attempts=3, base_s=1.0, max_s=1.5), waits.append) == "ok"
    assert len(calls) == 3 and 0.5 <= waits[0] <= 1.0 and 0.75 <= waits[1] <= 1.5


def test_credentials_that_are_missing_or_refused_are_not_retried():
    from botocore.exceptions import ClientError, NoCredentialsError
    from s3fs.errors import translate_boto_error

    def refused(code):
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": "no"}},
                                                "GetObject"))

    for exc, hint in ((NoCredentialsError(), "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
                      (refused("InvalidAccessKeyId"), "check AWS_ACCESS_KEY_ID"),
                      (refused("InvalidToken"), "check AWS_ACCESS_KEY_ID")):  # an OSError
        assert not is_transient(exc)
        calls, waits = [], []

        def fails(exc=exc):
            calls.append(1)
            raise exc

        with pytest.raises(CredentialsError, match=f"reading x failed: .*; {hint}"):
            retry(fails, "reading x", Backoff(attempts=3), waits.append)
        assert len(calls) == 1 and not waits


def test_planning_gives_up_on_an_endpoint_that_never_answered_but_not_on_a_flaky_one():
    """Inside ``give_up_when_unreachable`` (a job's planning, a report: someone waits at the
    console) an endpoint that was never reached is given up after one attempt, which
    botocore has retried already; an error after a connection is still retried in full."""
    from botocore.exceptions import EndpointConnectionError

    def count(exc):
        calls, waits = [], []

        def fails():
            calls.append(1)
            raise exc

        with pytest.raises(RetriesExhausted) as got:
            retry(fails, "listing x", Backoff(attempts=4), waits.append)
        return len(calls), str(got.value)

    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b")
    assert count(unreachable)[0] == 4  # elsewhere (actors, mid-job writes): every attempt
    with give_up_when_unreachable():
        calls, message = count(unreachable)
        assert calls == 1 and message.startswith("listing x failed once; last error: ")
        assert "the endpoint never answered" in message
        assert count(ConnectionResetError("reset by peer"))[0] == 4
    assert count(unreachable)[0] == 4


def test_output_writes_outlast_a_failing_store(front):
    out = Location.open("s3://runs/out", endpoint_url=front.url)
    out.fs.mkdir("runs")
    front.fail("PUT", r"^/runs/out/segments/", times=3)
    out.write_bytes("segments/a.parquet", b"done")
    assert front.failed == 3 and out.read_bytes("segments/a.parquet") == b"done"

    front.fail("PUT", r"^/runs/out/segments/", times=100)
    with pytest.raises(RetriesExhausted, match=r"writing s3://runs/out/segments/b.parquet "
                                               r"failed 4 times"):
        out.write_bytes("segments/b.parquet", b"x")
    front.heal()
    assert out.files("segments") == ["a.parquet"]

    front.fail("PUT", r"^/runs/out/segments/", times=5, status=403)
    before = front.failed
    with pytest.raises(PermissionError):
        out.write_bytes("segments/c.parquet", b"x")
    assert front.failed - before == 1  # a refusal is not retried


def test_reads_are_retried_and_a_store_that_keeps_failing_gives_an_error_row(
        front, s3, tiny_detector, video_factory, tmp_path, monkeypatch):
    direct, _ = filesystem("s3://videos", endpoint_url=s3.endpoint_url)
    direct.mkdir("videos")
    direct.mkdir("runs")
    video = video_factory(tmp_path / "v.mp4", 30)
    direct.put(str(video), "videos/v.mp4")
    # A proxy without a cache: every read of the video reaches the store.
    monkeypatch.setattr(proxy_module, "_PROXY", RangeProxy())
    (row,) = build_manifest([{"uri": "s3://videos/v.mp4", "size_bytes": video.stat().st_size,
                              "identity": "etag:1", "frames_total": 30, "fps": 10.0,
                              "width": 64, "height": 48, "duration_s": 3.0,
                              "probe_error": None}], 64, "fp").to_pylist()
    via_front, _ = filesystem("s3://videos", endpoint_url=front.url)
    out = Location.open("s3://runs/out", endpoint_url=front.url)
    actor = AnnotatorActor(
        model={**tiny_detector, "dtype": "float32"}, method="none", params={},
        decode={"fps": None, "frame_stride": 1}, input_fs=via_front,
        writer=SegmentWriter(out, "detection"), job={"job_id": "j", "fingerprint": "fp"},
        cpus=1)

    front.fail("GET", r"^/videos/v\.mp4", times=3)
    (ok,) = actor.process([row])
    assert ok["status"] == "ok" and ok["frames_decoded"] == 30 and front.failed == 3

    front.fail("GET", r"^/videos/v\.mp4", times=10**6)    # the store stops answering
    (bad,) = actor.process([row])                          # the segment is run again
    assert bad["status"] == "error" and bad["frames_decoded"] == 0
    # The store's own error, after the retries; never the loopback proxy's address.
    assert "reading it failed: RetriesExhausted: " in bad["error"], bad["error"]
    assert "127.0.0.1" not in bad["error"]
    (marker,) = read_segments(out).to_pylist()             # recorded as an error row
    assert marker["status"] == "error" and marker["error"] == bad["error"]

    front.heal()
    front.fail("PUT", r"^/runs/out/segments/", times=10**6)  # results cannot be stored
    out.remove("segments")
    with pytest.raises(RetriesExhausted):
        actor.process([row])
    assert completed_segments(out) == set()                # never marked complete
