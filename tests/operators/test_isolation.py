"""The decoder runs in a child process: a file that makes FFmpeg abort, a child killed by a
signal mid-segment, a read that never returns. None of them takes the caller down; a
segment resumes in a fresh child from the first frame it has not delivered, a bounded
number of times, then ends with the error."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from operators.decode import SegmentDecoder, VideoError, probe
from operators.isolation import DecoderProcess, child_env, shared_pool
from tests.badinput import hostile_frame_count, reference_frames

LOCAL = LocalFileSystem()


def read_all(decoder, on_frame=None):
    frames = []
    while (f := decoder.read()) is not None:
        frames.append(f)
        if on_frame:
            on_frame(decoder, f)
    return frames


def decoder_children() -> set[int]:
    """Pids of this process's decoder children."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"child_main" in cmdline:
                found.add(int(entry))
    return found


def test_a_decoder_that_dies_while_probing_is_a_probe_error_not_a_dead_process(tmp_path):
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)  # the child blocks opening it; then it dies by a signal
    shared_pool().close()
    result = {}

    def run():
        try:
            probe(LOCAL, str(fifo), timeout_s=60, retries=0)
        except VideoError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while not decoder_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it reach the blocking open
    for pid in decoder_children():
        os.kill(pid, signal.SIGSEGV)
    thread.join(30)
    assert result["error"].startswith("the decoder crashed (SIGSEGV") and \
        "(1 attempt)" in result["error"], result


def test_a_header_that_claims_billions_of_frames_is_not_believed(video_factory, tmp_path):
    # decord 0.6 sized its index from this header, threw std::bad_alloc and aborted the
    # process (SIGABRT). Frames are counted from the packets actually in the file.
    path = hostile_frame_count(video_factory(tmp_path / "ok.mp4", 12), tmp_path / "bomb.mp4")
    info = probe(LOCAL, str(path))
    assert info["frames_total"] == 12
    assert info["probe_warning"].startswith("incomplete: the container lists 3,355,443,200 "
                                            "frames, the file holds 12")


def test_a_child_killed_mid_segment_is_replaced_and_the_segment_completes(video_factory,
                                                                           tmp_path):
    path = video_factory(tmp_path / "v.mp4", 40, gop=8)
    reference = reference_frames(path)
    killed = []

    def kill_once(decoder, frame):
        if frame.index == 10 and not killed:
            killed.append(decoder.child_pid)
            os.kill(decoder.child_pid, signal.SIGSEGV)

    indices = list(range(0, 40, 2))
    decoder = SegmentDecoder(LOCAL, str(path), indices)
    frames = read_all(decoder, kill_once)
    assert decoder.error is None and decoder.restarts == 1 and killed
    assert [f.index for f in frames] == indices  # nothing lost, nothing twice
    for f in frames:
        assert np.array_equal(f.rgb, reference[f.index])


def test_a_decoder_that_keeps_crashing_gives_up_after_its_retries(video_factory, tmp_path):
    path = video_factory(tmp_path / "v.mp4", 30)
    pids = set()

    def kill_every_child(decoder, frame):
        if frame.index >= 5 and decoder.child_pid not in pids:
            pids.add(decoder.child_pid)
            os.kill(decoder.child_pid, signal.SIGKILL)

    decoder = SegmentDecoder(LOCAL, str(path), list(range(30)), retries=1)
    frames = read_all(decoder, kill_every_child)
    assert len(pids) == 2 and decoder.restarts == 1
    n = len(frames)
    assert [f.index for f in frames] == list(range(n)) and 6 <= n < 30
    assert decoder.error.startswith(f"decoding failed at frame {n}: the decoder crashed "
                                    "(SIGKILL, killed: out of memory?"), decoder.error
    assert decoder.error.endswith("(2 attempts)")


def test_a_read_that_never_returns_is_a_hang_and_times_out(tmp_path):
    fifo = tmp_path / "stalled.mp4"
    os.mkfifo(fifo)  # opening it blocks until a writer comes, which never does
    t0 = time.monotonic()
    with pytest.raises(VideoError, match=r"made no progress for 0\.5 s .* \(2 attempts\)"):
        probe(LOCAL, str(fifo), timeout_s=0.5)
    decoder = SegmentDecoder(LOCAL, str(fifo), [0, 1], timeout_s=0.5, retries=1)
    assert decoder.read() is None and decoder.frames_decoded == 0
    assert "made no progress for 0.5 s" in decoder.error and decoder.restarts == 1
    assert time.monotonic() - t0 < 20


def test_the_child_has_no_credentials_and_dies_with_its_parent(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret-in-parent")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "canary-token-in-parent")
    assert "AWS_SECRET_ACCESS_KEY" not in child_env()
    proc = DecoderProcess()
    try:
        environ = open(f"/proc/{proc.pid}/environ", "rb").read()
        assert b"canary" not in environ and b"AWS_SECRET" not in environ
    finally:
        proc.kill()

    # A parent that dies without cleaning up: its child notices and exits.
    code = ("from operators.isolation import DecoderProcess; import os; "
            "p = DecoderProcess(); print(p.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, check=True)
    orphan = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{orphan}"):
        status = open(f"/proc/{orphan}/status").read() if os.path.exists(
            f"/proc/{orphan}/status") else ""
        if "State:\tZ" in status:
            break
        time.sleep(0.2)
    alive = os.path.exists(f"/proc/{orphan}/status") and "State:\tZ" not in open(
        f"/proc/{orphan}/status").read()
    assert not alive, "the decoder child outlived its parent"


def test_frames_narrower_than_32_pixels_come_out_right(video_factory, tmp_path):
    # decord returns (H, W, 16) for a 6-pixel-wide frame, (H, W, 4) for 24 or 72 pixels ...
    for width in (2, 6, 24, 72):
        path = video_factory(tmp_path / f"w{width}.mp4", 3, size=(width, 8))
        frames = read_all(SegmentDecoder(LOCAL, str(path), [0, 1, 2]))
        reference = reference_frames(path)
        assert [f.rgb.shape for f in frames] == [(8, width, 3)] * 3
        for f in frames:
            assert np.array_equal(f.rgb, reference[f.index]), width


def test_decoder_memory_does_not_grow_with_the_segment(video_factory, tmp_path):
    """The child's peak RSS over 1,500 frames stays within 1.2x of 150 frames: frames go
    through a fixed ring, nothing accumulates (docs/MEMORY.md measures 1080p)."""
    path = video_factory(tmp_path / "long.mp4", 1500, size=(320, 240), fps=30, gop=30)

    def peak_rss_kib(frames: int) -> int:
        shared_pool().close()  # a fresh child for each measurement
        decoder = SegmentDecoder(LOCAL, str(path), list(range(frames)))
        while decoder.read() is not None:
            if decoder.frames_decoded == frames:  # the child has done all its work
                status = open(f"/proc/{decoder.child_pid}/status").read()
        assert decoder.error is None and decoder.restarts == 0
        return int(status.split("VmHWM:")[1].split()[0])

    short, long = peak_rss_kib(150), peak_rss_kib(1500)
    assert long <= 1.2 * short, (short, long)
