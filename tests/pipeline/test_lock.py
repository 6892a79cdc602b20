"""The output lock: one job per output location, on local folders and on S3 (conditional
writes on the moto server); stale locks of dead jobs are taken over, a job that lost its
lock finds out, and a second job is refused before it writes anything."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from jobs.cli import main
from pipeline.lock import LOCK_DIR, LockLost, OutputLock, OutputLocked
from pipeline.storage import Location
from tests.faults import deny_writes


def locks(location: Location) -> list[str]:
    return location.files(LOCK_DIR)


def test_one_holder_at_a_time_locally(tmp_path):
    out = Location.open(str(tmp_path / "out"))
    first = OutputLock(out, "job-a")
    first.acquire()
    with pytest.raises(OutputLocked, match=r"in use by job job-a \(host .*pid \d+\)"):
        OutputLock(out, "job-b").acquire()
    first.release()
    assert locks(out) == []
    with OutputLock(out, "job-b") as second:
        assert second.generation == 1 and second.took_over is None


def test_racing_jobs_get_exactly_one_lock(tmp_path):
    out = Location.open(str(tmp_path / "out"))
    winners, refused = [], []
    start = threading.Barrier(8)

    def contend(i):
        lock = OutputLock(out, f"job-{i}", heartbeat_s=60)
        start.wait()
        try:
            lock.acquire()
            winners.append(lock)
        except OutputLocked:
            refused.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 7
    winners[0].release()


def write_lock(out: Location, generation: int, job_id: str, heartbeat_at: float,
               host: str = "elsewhere", pid: int = 4242) -> None:
    out.write_bytes(f"{LOCK_DIR}/{generation:012d}.json", json.dumps({
        "job_id": job_id, "host": host, "pid": pid, "token": "t", "started_at": heartbeat_at,
        "heartbeat_at": heartbeat_at}).encode())


def test_stale_and_dead_holders_are_taken_over(tmp_path):
    out = Location.open(str(tmp_path / "out"))
    write_lock(out, 3, "crashed-long-ago", time.time() - 1000)
    with OutputLock(out, "job-new", stale_after_s=300) as lock:
        assert lock.generation == 4 and lock.took_over.job_id == "crashed-long-ago"
        assert locks(out) == ["000000000004.json"]  # the old generation is cleaned up

    # On this host, a holder whose process is gone is stale at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    write_lock(out, 7, "killed-driver", time.time(), socket.gethostname(), int(dead.stdout))
    with OutputLock(out, "job-resume") as lock:
        assert lock.took_over.job_id == "killed-driver"

    # A fresh heartbeat from another host is not stale.
    write_lock(out, 9, "running-elsewhere", time.time())
    with pytest.raises(OutputLocked, match="running-elsewhere"):
        OutputLock(out, "job-x").acquire()


def test_a_holder_that_was_taken_over_finds_out(tmp_path):
    out = Location.open(str(tmp_path / "out"))
    slow = OutputLock(out, "paused-job", heartbeat_s=0.1, stale_after_s=0.5)
    slow.acquire()
    slow._stop.set()  # its heartbeat stops, as in a process that was paused
    slow._thread.join()
    time.sleep(0.7)
    with OutputLock(out, "next-job", stale_after_s=0.5) as taker:
        assert taker.took_over.job_id == "paused-job"
        with pytest.raises(LockLost, match="taken over; it is now held by job next-job"):
            slow.refresh()
        slow._lost = "taken over"
        slow.release()  # must not remove the new holder's lock
        assert locks(out) == [f"{taker.generation:012d}.json"]


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    out = Location.open(str(tmp_path / "out"))
    with OutputLock(out, "job-a", heartbeat_s=0.05) as lock:
        before = lock.holder()[1].heartbeat_at
        time.sleep(0.3)
        assert lock.holder()[1].heartbeat_at > before and lock.lost is None


def test_s3_conditional_writes_make_the_lock_exclusive(s3):
    out = Location.open("s3://runs/nightly", endpoint_url=s3.endpoint_url)
    out.fs.mkdir("runs")
    messages = []
    first = OutputLock(out, "job-a", log=messages.append)
    first.acquire()
    assert messages == []  # moto honours If-None-Match: no best-effort warning
    with pytest.raises(OutputLocked, match="job-a"):
        OutputLock(out, "job-b").acquire()
    first.release()
    assert locks(out) == []
    with OutputLock(out, "job-b") as second:
        assert second.generation == 1


def test_a_missing_bucket_or_denied_access_is_an_error_not_a_best_effort_lock(s3):
    """Only a store that refuses conditional writes makes the lock best effort: a missing
    bucket or denied access raises, with no note about conditional writes."""
    messages = []
    missing = Location.open("s3://no-such-bucket/nightly", endpoint_url=s3.endpoint_url)
    with pytest.raises(FileNotFoundError):
        OutputLock(missing, "job-a", settle_s=0, log=messages.append).acquire()
    denied = Location.open("s3://runs/nightly", endpoint_url=s3.endpoint_url)
    denied.fs.mkdir("runs")
    deny_writes(denied)
    with pytest.raises(PermissionError):
        OutputLock(denied, "job-a", settle_s=0, log=messages.append).acquire()
    assert messages == []
    assert denied.fs.find("runs") == []


def test_a_job_refuses_an_output_another_job_is_writing(tmp_path, tiny_detector,
                                                        sample_videos, capsys):
    out = Location.open(str(tmp_path / "out"))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": {"uri": str(sample_videos / "mma_part_0.mp4")},
                                    "model": tiny_detector, "pruning": {"method": "none"},
                                    "output": {"uri": out.uri}}))
    other = OutputLock(out, "other-job-20260101")
    other.acquire()
    try:
        for extra in ([], ["--dry-run"], ["--set", "output.mode=overwrite"]):
            assert main(["run", str(spec), *extra]) == 2
            err = capsys.readouterr().err
            assert "is in use by job other-job-20260101" in err, err
        assert os.listdir(out.root) == [LOCK_DIR]  # nothing written
    finally:
        other.release()
