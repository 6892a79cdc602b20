"""Probing spread over Ray tasks gives what probing on the driver gives; MP4s are probed
from their headers, other containers (and broken files) by decord."""

import shutil

from fsspec.implementations.local import LocalFileSystem

from pipeline.listing import list_videos, probe_videos, probe_videos_on_cluster


def test_probes_in_ray_tasks_equal_probes_on_the_driver(ray_session, video_factory, tmp_path,
                                                        sample_videos):
    for i in range(8):
        video_factory(tmp_path / f"v{i}.mp4", 5 + i)
    shutil.copy(sample_videos / "decord_flipping_a_pancake.mkv", tmp_path / "pancake.mkv")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mov").write_bytes(b"\x00" * 100)
    fs = LocalFileSystem()
    videos = list_videos(fs, str(tmp_path), ["*.mp4", "*.mkv", "*.mov"])
    assert len(videos) == 11

    here = probe_videos(fs, videos)
    first = next(i for i, v in enumerate(videos) if v.uri.endswith("v0.mp4"))
    known = {(videos[first].uri, videos[first].identity): {**here[first], "frames_total": 999}}
    spread = probe_videos_on_cluster(fs, videos, nodes=1, known=known)  # 2 tasks of 8 and 2
    assert spread[first]["frames_total"] == 999      # known probes are reused, not redone
    assert spread[:first] + spread[first + 1:] == here[:first] + here[first + 1:]
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in spread}
    assert [rows[f"v{i}.mp4"]["frames_total"] for i in range(1, 8)] == list(range(6, 13))
    assert rows["pancake.mkv"]["frames_total"] == 310
    assert rows["empty.mp4"]["probe_error"] == "an empty file (0 bytes)"
    assert rows["junk.mov"]["probe_error"]
