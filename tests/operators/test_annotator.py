"""The annotator actor's work, without Ray: segments side by side in lockstep give what each
gives alone, and every segment leaves its annotations and then its completion marker."""

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from operators.annotator import AnnotatorActor
from pipeline.manifest import build_manifest
from pipeline.outputs import SegmentWriter, completed_segments, read_annotations
from pipeline.schemas import DETECTIONS, RECOGNITIONS, SEGMENTS
from pipeline.storage import Location

LOCAL = LocalFileSystem()


def manifest_rows(videos, segment_frames, fps=None, frame_stride=1):
    from operators.decode import probe

    probes = []
    for path in videos:
        try:
            info = probe(LOCAL, str(path))
            error = None
        except Exception as exc:  # noqa: BLE001 - the manifest records it
            info, error = {"frames_total": 0, "fps": 0.0, "width": 0, "height": 0,
                           "duration_s": 0.0}, str(exc)
        probes.append({"uri": str(path), "size_bytes": path.stat().st_size,
                       "identity": "test", "probe_error": error, **info})
    return build_manifest(probes, segment_frames, "fp", fps, frame_stride).to_pylist()


def actor(model, out, task, decode=None, top_k=5, method="none", params=None):
    return AnnotatorActor(
        model={**model, "score_threshold": 0.0, "dtype": "float32", "top_k": top_k},
        method=method, params=params or {}, decode=decode or {"fps": None, "frame_stride": 1},
        input_fs=LOCAL, writer=SegmentWriter(Location.open(str(out)), task),
        job={"job_id": "job-1", "fingerprint": "fp"}, cpus=1)


@pytest.fixture(autouse=True)
def one_thread():
    """What the actor does inside Ray; restored for the tests that follow."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_lockstep_segments_match_segments_run_alone(tiny_detector, video_factory, tmp_path,
                                                    sample_videos):
    videos = [video_factory(tmp_path / "long.mp4", 30), video_factory(tmp_path / "short.mp4", 9)]
    rows = manifest_rows(videos, segment_frames=20)   # long.mp4: 20 + 10 frames
    rows += manifest_rows([sample_videos / "decord_corrupted.mp4"], segment_frames=64)
    assert len(rows) == 4

    together = actor(tiny_detector, tmp_path / "together", "detection").process(rows)
    alone = []
    one = actor(tiny_detector, tmp_path / "alone", "detection")
    for row in rows:
        alone += one.process([row])

    for a, b in zip(together, alone):
        for key in ("segment_id", "status", "frames_decoded", "first_frame", "last_frame",
                    "annotations"):
            assert a[key] == b[key], key
        assert a["gmacs_dense"] == pytest.approx(b["gmacs_dense"])
        assert a["gmacs_run"] == pytest.approx(b["gmacs_run"])
    by_uri = {(s["uri"].rsplit("/", 1)[1], s["segment_index"]): s for s in together}
    assert by_uri[("long.mp4", 0)]["frames_decoded"] == 20
    assert by_uri[("long.mp4", 1)]["first_frame"] == 20
    assert by_uri[("short.mp4", 0)]["status"] == "ok"
    broken = by_uri[("decord_corrupted.mp4", 0)]
    assert broken["status"] == "partial" and broken["frames_decoded"] == 28
    assert broken["error"].startswith("decoding failed at frame 28")

    out = Location.open(str(tmp_path / "together"))
    assert completed_segments(out) == {r["segment_id"] for r in rows}
    ann = read_annotations(out, "detection")
    assert ann.schema == DETECTIONS
    alone_ann = read_annotations(Location.open(str(tmp_path / "alone")), "detection")
    key = ["segment_id", "frame_index", "label_id", "x0", "y0"]
    a = ann.to_pandas().sort_values(key).reset_index(drop=True)
    b = alone_ann.to_pandas().sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) > 0
    assert (a["frame_index"] == b["frame_index"]).all()
    assert a["score"].to_numpy() == pytest.approx(b["score"].to_numpy(), abs=1e-4)
    # Boxes are in original pixels: inside the 64x48 frame of the generated clips.
    gen = a[a["uri"].str.endswith("long.mp4")]
    assert gen["x1"].max() <= 64 and gen["y1"].max() <= 48 and gen["x0"].min() >= 0
    marker = pq.read_table(tmp_path / "together" / "segments" / f"{rows[0]['segment_id']}.parquet")
    assert marker.schema == SEGMENTS and marker.num_rows == 1


@pytest.mark.parametrize("fails_at, status", [(3, "partial"), (1, "error")])
def test_frames_count_what_the_model_ran_when_it_fails(tiny_detector, video_factory, tmp_path,
                                                       fails_at, status):
    """A model error ends the segment: frames_decoded counts the frames the model ran (not
    the one it failed on), and a segment where it ran none is an error, not partial."""
    rows = manifest_rows([video_factory(tmp_path / "v.mp4", 9)], segment_frames=64)
    one = actor(tiny_detector, tmp_path / "out", "detection")
    step, calls = one.runner.step, []

    def failing(frames, state):
        calls.append(1)
        if len(calls) == fails_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(frames, state)

    one.runner.step = failing
    (stats,) = one.process(rows)
    assert stats["status"] == status and stats["error"].startswith("model error")
    assert stats["frames_decoded"] == fails_at - 1
    assert stats["last_frame"] == (fails_at - 2 if fails_at > 1 else None)


def test_work_on_the_padding_of_ragged_lockstep_streams_is_reported_apart(
        tiny_detector, video_factory, tmp_path, sample_videos):
    """Eventful's threshold policy selects a different number of tokens in each stream; run
    side by side, the shorter selections are padded, and that work (executed, but not the
    stream's method's) is reported as gmacs_padding, outside gmacs_run, which stays what the
    segment costs alone."""
    videos = [video_factory(tmp_path / "gen.mp4", 12), sample_videos / "mma_test.mp4"]
    rows = [manifest_rows([v], segment_frames=12)[0] for v in videos]
    params = {"policy": "threshold", "threshold": 0.5}
    together = actor(tiny_detector, tmp_path / "together", "detection", method="eventful",
                     params=params).process(rows)
    one = actor(tiny_detector, tmp_path / "alone", "detection", method="eventful",
                params=params)
    alone = [one.process([row])[0] for row in rows]
    assert sum(s["gmacs_padding"] for s in together) > 0
    assert [s["gmacs_padding"] for s in alone] == [0.0, 0.0]
    for a, b in zip(together, alone):
        assert a["gmacs_run"] == pytest.approx(b["gmacs_run"])
        assert a["gmacs_run"] < a["gmacs_dense"]
    marker = pq.read_table(tmp_path / "together" / "segments" / f"{rows[0]['segment_id']}.parquet")
    assert marker.schema == SEGMENTS
    assert marker.column("gmacs_padding")[0].as_py() == together[0]["gmacs_padding"]


def test_recognition_clips_carry_global_frames_and_times(tiny_recognizer, video_factory,
                                                         tmp_path):
    # 4-frame clips of every 2nd frame: frames 0,2,4,6 | 8,10,12,14 | ... in segments of 20.
    video = video_factory(tmp_path / "v.mp4", 45)
    rows = manifest_rows([video], segment_frames=20, frame_stride=2)
    stats = actor(tiny_recognizer, tmp_path / "out", "recognition",
                  decode={"fps": None, "frame_stride": 2}, top_k=3).process(rows)
    assert [s["frames_decoded"] for s in stats] == [10, 10, 3]
    ann = read_annotations(Location.open(str(tmp_path / "out")), "recognition")
    assert ann.schema == RECOGNITIONS
    t = ann.to_pandas()
    assert set(t["rank"]) == {1, 2, 3}
    clips = t[t["rank"] == 1].sort_values("first_frame")
    # Two full clips per 20-frame segment (the half-clip at its end is dropped), and the
    # 3-frame last segment still gets one (padded) clip.
    assert clips["first_frame"].tolist() == [0, 8, 20, 28, 40]
    assert clips["last_frame"].tolist() == [6, 14, 26, 34, 44]
    assert clips["frames"].tolist() == [4, 4, 4, 4, 3]  # 40, 42, 44 and 44 again
    assert clips["clip_start_s"].tolist() == pytest.approx([0.0, 0.8, 2.0, 2.8, 4.0], abs=1e-3)
    assert clips["clip_end_s"].tolist() == pytest.approx([0.7, 1.5, 2.7, 3.5, 4.5], abs=1e-3)
    top = t.sort_values(["first_frame", "rank"]).groupby("first_frame")["score"].apply(list)
    assert all(s == sorted(s, reverse=True) for s in top)
