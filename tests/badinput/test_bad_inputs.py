"""One job over an archive of everything that is not a clean video, on the real path (real
decoder child processes, real Ray): every input gets a `videos/` row with a status and an
error that says what the file is, the job finishes, the good videos' results are intact,
and nothing is written outside the output folder."""

import json
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from tests.badinput import (audio_only, hostile_frame_count, image, truncated, unknown_codec,
                            variable_frame_rate, video)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, sample_videos):
    """name -> (expected status, what the error must say)."""
    root = tmp_path_factory.mktemp("archive")
    tmp = tmp_path_factory.mktemp("scratch")
    plain, fast = video(tmp / "plain.mp4", 40), video(tmp / "fast.mp4", 40, faststart=True)
    expect = {}

    def add(name, status, error=None):
        expect[name] = (status, error)

    shutil.copy(plain, root / "good.mp4")
    add("good.mp4", "ok")
    shutil.copy(sample_videos / "decord_corrupted.mp4", root / "corrupted.mp4")
    add("corrupted.mp4", "partial", r"^segment 1: decoding failed at frame 28: .*Invalid data")
    shutil.copy(sample_videos / "decord_video_90.mov", root / "rotated.mov")
    add("rotated.mov", "ok")
    shutil.copy(sample_videos / "decord_unordered.mov", root / "unordered.mov")
    add("unordered.mov", "ok")
    variable_frame_rate(root / "vfr.mp4")
    add("vfr.mp4", "ok")
    video(root / "single.mp4", 1)
    add("single.mp4", "ok")
    video(root / "tiny.mp4", 6, size=(24, 16))
    add("tiny.mp4", "ok")
    video(root / "uhd.mp4", 2, size=(3840, 2160), preset="ultrafast")
    add("uhd.mp4", "ok")
    # Truncated uploads: index (moov) first, cut in the data: the frames before the cut.
    truncated(fast, root / "cut-fast-60.mp4", 0.6)
    add("cut-fast-60.mp4", "partial", r"incomplete: the container lists 40 frames, the file "
                                      r"holds \d+")
    truncated(fast, root / "cut-fast-3.mp4", 0.03)
    add("cut-fast-3.mp4", "error", r"^a truncated file: it ends at byte [\d,]+, inside its "
                                   r"'moov' box")
    # Index last (the default): cut anywhere, the index is gone.
    truncated(plain, root / "cut-plain-50.mp4", 0.5)
    add("cut-plain-50.mp4", "error", r"^a truncated file: .*inside its 'mdat' box")
    truncated(plain, root / "cut-plain-90.mp4", 0.9)
    add("cut-plain-90.mp4", "error", r"^a truncated file: .*inside its 'moov' box")
    (root / "empty.mp4").write_bytes(b"")
    add("empty.mp4", "error", r"^an empty file \(0 bytes\)$")
    (root / "notes.mp4").write_text("meeting notes, not a video\n")
    add("notes.mp4", "error", r"^not a video: a text file")
    image(root / "photo.mp4", "png")
    add("photo.mp4", "error", r"^not a video: an image \(PNG\)")
    image(root / "photo.mov", "mjpeg")
    add("photo.mov", "error", r"^not a video: an image \(JPEG\)")
    (root / "folder.mp4").mkdir()
    add("folder.mp4", "error", r"^a folder named like a video, not a video file$")
    audio_only(root / "podcast.mp4")
    add("podcast.mp4", "error", r"^no video track: only audio \(mp4a\)")
    unknown_codec(plain, root / "codec.mp4")
    add("codec.mp4", "error", r"^its video track uses codec 'zzzz', which the decoder does "
                              r"not know")
    hostile_frame_count(plain, root / "liar.mp4")
    add("liar.mp4", "partial", r"^incomplete: the container lists 3,355,443,200 frames, the "
                               r"file holds 40")
    os.mkfifo(root / "pipe.mp4")
    add("pipe.mp4", "error", r"^not a regular file")
    # A playlist dressed as a video must not make FFmpeg read the file it names.
    secret = tmp / "secret.txt"
    secret.write_text("canary-local-file\n")
    (root / "playlist.mp4").write_text(f"#EXTM3U\n#EXTINF:1,\nfile://{secret}\n#EXT-X-ENDLIST\n")
    add("playlist.mp4", "error", r"^not a video: a text file")
    (root / "ffconcat.mkv").write_text(f"ffconcat version 1.0\nfile '{plain}'\n")
    add("ffconcat.mkv", "error", r"^not a video: a text file")
    # Names with spaces, unicode, dots, a newline, shell and path characters.
    for name in ("with space.mp4", "ünïcødé 視頻.mp4", "dots..in...name.mp4", "line\nbreak.mp4",
                 "$(touch pwned);`x` & 'q'.mp4", "-rf.mp4", "back\\slash%2F..%2F.mp4"):
        shutil.copy(plain, root / name)
        add(name, "ok")
    (root / "b").mkdir()
    shutil.copy(plain, root / "b" / "nested.mp4")
    add("b/nested.mp4", "ok")
    return root, expect


def test_every_bad_input_is_a_row_and_the_job_finishes(ray_session, archive, tiny_detector,
                                                       tmp_path, capsys):
    root, expect = archive
    before = sorted(os.listdir(root))
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"uri": str(root)}, "model": {**tiny_detector, "score_threshold": 0.0},
        "pruning": {"method": "none"}, "decode": {"segment_frames": 16, "timeout_s": 30},
        "resources": {"actors": 1, "streams_per_actor": 2}, "output": {"uri": str(out)}}))
    assert main(["run", str(spec)]) == 0, capsys.readouterr().err

    rows = {v["uri"][len(str(root)) + 1:]: v for v in
            pq.read_table(out / "videos" / "videos.parquet").to_pylist()}
    assert sorted(rows) == sorted(expect)  # every input accounted for, once
    for name, (status, pattern) in expect.items():
        row = rows[name]
        assert row["status"] == status, (name, row["status"], row["error"])
        if pattern:
            assert re.search(pattern, row["error"]), (name, row["error"])
        else:
            assert row["error"] is None and row["frames_decoded"] == row["frames_expected"] > 0
        assert "canary-local-file" not in (row["error"] or "")

    # The good videos' results are whole: every frame annotated once, in its own numbering.
    ann = pq.read_table(out / "annotations").to_pandas()
    for name, (status, _) in expect.items():
        frames = sorted(set(ann[ann["uri"] == str(root / name)]["frame_index"]))
        if status == "ok":
            assert frames == list(range(rows[name]["frames_total"])), name
    assert rows["rotated.mov"]["width"] == 320 and rows["rotated.mov"]["height"] == 568
    assert rows["uhd.mp4"]["width"] == 3840 and rows["tiny.mp4"]["width"] == 24
    assert rows["cut-fast-60.mp4"]["frames_decoded"] > 0
    assert rows["corrupted.mp4"]["frames_decoded"] == 28
    # Variable frame rate: 20 frames at 30 fps, then 10 fps; timestamps follow the stream.
    vfr = ann[ann["uri"] == str(root / "vfr.mp4")].groupby("frame_index")["timestamp_s"].first()
    steps = vfr.diff().dropna().round(4).tolist()
    assert steps[:19] == [round(1 / 30, 4)] * 19 and steps[-1] == 0.1
    unordered = ann[ann["uri"] == str(root / "unordered.mov")].sort_values("frame_index")
    assert unordered["timestamp_s"].is_monotonic_increasing

    # Nothing outside the output folder, nothing but the expected files inside it, the input
    # untouched; file names come from ids, never from video names.
    assert sorted(os.listdir(root)) == before and not (tmp_path / "pwned").exists()
    assert not os.path.exists("pwned")
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    pattern = re.compile(r"^(job\.json|manifest/manifest\.parquet|videos/videos\.parquet|"
                         r"(annotations|segments)/[0-9a-f]{24}\.parquet)$")
    assert written and all(pattern.match(p) for p in written), written
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "finished" and job["totals"]["videos"] == len(expect)
