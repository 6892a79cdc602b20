"""Listing, segment manifests and their deterministic ids."""

import os

import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.listing import FOLDER, list_videos, matches
from pipeline.manifest import build_manifest, segment_id, segment_spans, video_id
from pipeline.schemas import MANIFEST
from pipeline.storage import StorageError


def probe_row(uri, frames, fps=30.0, error=None, identity="etag:1"):
    return {"uri": uri, "size_bytes": 1000, "identity": identity, "frames_total": frames,
            "fps": fps, "width": 64, "height": 48, "duration_s": frames / fps,
            "probe_error": error}


def test_segment_spans_cover_the_video_once():
    assert segment_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert segment_spans(8, 4) == [(0, 4), (4, 8)]
    assert segment_spans(3, 2048) == [(0, 3)]


def test_manifest_is_longest_first_with_unreadable_videos_last():
    table = build_manifest([probe_row("/v/a.mp4", 100), probe_row("/v/b.mp4", 250),
                            probe_row("/v/bad.mp4", 0, error="not a video"),
                            probe_row("/v/c.mp4", 40)], segment_frames=100,
                           job_fingerprint="fp")
    assert table.schema == MANIFEST
    rows = table.to_pylist()
    spans = [(r["uri"][3:], r["start_frame"], r["end_frame"]) for r in rows]
    assert spans == [("a.mp4", 0, 100), ("b.mp4", 0, 100), ("b.mp4", 100, 200),
                     ("b.mp4", 200, 250), ("c.mp4", 0, 40), ("bad.mp4", 0, 0)]
    b = [r for r in rows if r["uri"] == "/v/b.mp4"]
    assert {r["segments_total"] for r in b} == {3} and sorted(r["segment_index"] for r in b) == [0, 1, 2]
    assert rows[-1]["probe_error"] == "not a video" and rows[-1]["segments_total"] == 0
    assert len({r["segment_id"] for r in rows}) == len(rows)


def test_frames_expected_follows_the_sampling_and_orders_the_work():
    table = build_manifest([probe_row("/v/fast.mp4", 600, fps=60.0),
                            probe_row("/v/slow.mp4", 400, fps=10.0)], 1000, "fp", fps=5.0)
    rows = table.to_pylist()
    # 600 frames at 60 fps sampled at 5 fps: 50 frames; 400 at 10 fps: 200 frames.
    assert [(r["uri"], r["frames_expected"]) for r in rows] == [("/v/slow.mp4", 200),
                                                                ("/v/fast.mp4", 50)]


def test_ids_are_deterministic_and_change_with_settings_or_content():
    a = segment_id("fp1", "s3://b/v.mp4", "etag:1", 0, 100)
    assert a == segment_id("fp1", "s3://b/v.mp4", "etag:1", 0, 100)
    assert a != segment_id("fp2", "s3://b/v.mp4", "etag:1", 0, 100)      # other settings
    assert a != segment_id("fp1", "s3://b/v.mp4", "etag:2", 0, 100)      # new content
    assert a != segment_id("fp1", "s3://b/v.mp4", "etag:1", 100, 200)    # next segment
    assert video_id("s3://b/v.mp4") == video_id("s3://b/v.mp4") != video_id("s3://b/w.mp4")


def test_listing_is_recursive_case_insensitive_and_skips_hidden_files(tmp_path):
    for name in ("a.mp4", "B.MKV", "sub/c.mov", "sub/deeper/d.avi", "notes.txt", ".hidden.mp4",
                 ".cache/e.mp4", "sub/clip.mp4.part"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.mp4").mkdir()  # a directory named like a video: listed, as a problem
    found = list_videos(LocalFileSystem(), str(tmp_path), ["*.mp4", "*.mkv", "*.mov", "*.avi"])
    assert [v.uri[len(str(tmp_path)) + 1:] for v in found] == [
        "B.MKV", "a.mp4", "folder.mp4", "sub/c.mov", "sub/deeper/d.avi"]
    folder = found.pop(2)
    assert folder.problem == FOLDER and folder.size_bytes == 0
    assert all(v.size_bytes == 1 and v.identity.startswith("size:1:") and v.problem is None
               for v in found)
    only_sub = list_videos(LocalFileSystem(), str(tmp_path), ["sub/*.mov"])
    assert [v.uri.rsplit("/", 1)[1] for v in only_sub] == ["c.mov"]
    single = list_videos(LocalFileSystem(), str(tmp_path / "notes.txt"), ["*.mp4"])
    assert len(single) == 1  # a single file is taken whatever its name
    with pytest.raises(StorageError, match="does not exist"):
        list_videos(LocalFileSystem(), str(tmp_path / "nope"), ["*.mp4"])
    assert matches("x/Y.Mp4", ["*.mp4"]) and not matches("x/y.mp4", ["z/*.mp4"])


def test_symbolic_links_are_followed_to_their_files(tmp_path):
    """Archives are often folders of links (to dedupe, or to pick clips); a link to a file is
    that file; a broken link or a link to a folder is a row with a clear problem."""
    store, root = tmp_path / "store", tmp_path / "in"
    store.mkdir()
    root.mkdir()
    (store / "real.mp4").write_bytes(b"12345")
    (store / "dir.mp4").mkdir()
    os.symlink(store / "real.mp4", root / "link.mp4")
    os.symlink(store / "gone.mp4", root / "broken.mp4")
    os.symlink(store / "dir.mp4", root / "folder_link.mp4")
    os.symlink(root / "loop.mp4", root / "loop.mp4")  # points at itself
    found = {v.uri.rsplit("/", 1)[1]: v for v in list_videos(LocalFileSystem(), str(root),
                                                              ["*.mp4"])}
    assert set(found) == {"link.mp4", "broken.mp4", "folder_link.mp4", "loop.mp4"}
    assert found["link.mp4"].problem is None and found["link.mp4"].size_bytes == 5
    assert found["link.mp4"].identity.startswith("size:5:")
    assert found["broken.mp4"].problem == "a symbolic link to a file that does not exist"
    assert found["folder_link.mp4"].problem == FOLDER
    assert found["loop.mp4"].problem.startswith("a symbolic link whose target cannot be read")
