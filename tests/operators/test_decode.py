"""Decoding segments in order with decord: sampling on global frame indices, seeking into the
middle of a video, and what a broken stream leaves behind."""

import decord
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from operators.decode import SegmentDecoder, probe, sampled_indices, sampling_ratio

LOCAL = LocalFileSystem()


def read_all(decoder: SegmentDecoder):
    frames = []
    while (f := decoder.read()) is not None:
        frames.append(f)
    return frames


@pytest.mark.parametrize("ratio", [1.0, 0.5, 1 / 3, 5 / 6, 0.25 / 4])
def test_segments_sample_exactly_what_the_whole_video_samples(ratio):
    whole = sampled_indices(0, 1000, ratio)
    pieces = [i for start in range(0, 1000, 37)
              for i in sampled_indices(start, min(1000, start + 37), ratio)]
    assert pieces == whole
    assert whole[0] == 0
    assert len(whole) == pytest.approx(1000 * ratio, abs=1)


def test_sampling_ratio():
    assert sampling_ratio(30.0, None) == 1.0
    assert sampling_ratio(30.0, 60.0) == 1.0          # never above the native rate
    assert sampling_ratio(30.0, 10.0) == pytest.approx(1 / 3)
    assert sampling_ratio(30.0, 10.0, stride=2) == pytest.approx(1 / 6)
    assert sampling_ratio(0.0, 10.0) == 1.0           # unknown rate: every frame


def test_a_segment_in_the_middle_gives_the_same_frames_as_decord(video_factory, tmp_path):
    path = video_factory(tmp_path / "v.mp4", 60, gop=8)
    reference = decord.VideoReader(str(path)).get_batch(list(range(60))).asnumpy()
    indices = sampled_indices(23, 47, 0.5)
    frames = read_all(SegmentDecoder(LOCAL, str(path), indices))
    assert [f.index for f in frames] == indices
    for f in frames:
        assert np.array_equal(f.rgb, reference[f.index])
    assert frames[1].timestamp_s == pytest.approx(frames[1].index / 10, abs=1e-3)


def test_a_broken_stream_keeps_the_frames_before_the_damage(sample_videos):
    path = str(sample_videos / "decord_corrupted.mp4")
    decoder = SegmentDecoder(LOCAL, path, list(range(50)))
    frames = read_all(decoder)
    # The clip's README: decoding fails after 28 frames. decord decodes ahead in a thread and
    # an error there can drop good frames; the decoder reopens and recovers them.
    assert [f.index for f in frames] == list(range(28))
    assert decoder.error.startswith("decoding failed at frame 28: ")
    assert "github/workspace" not in decoder.error  # decord's C++ log prefixes are dropped


def test_a_missing_file_is_an_error_not_an_exception(tmp_path):
    decoder = SegmentDecoder(LOCAL, str(tmp_path / "gone.mp4"), [0, 1])
    assert decoder.read() is None
    assert decoder.frames_decoded == 0 and "the file is gone" in decoder.error


def test_probe(sample_videos):
    info = probe(LOCAL, str(sample_videos / "mma_test.avi"))
    assert info["frames_total"] == 164 and info["fps"] == 25.0
    assert (info["width"], info["height"]) == (320, 240)
    assert info["duration_s"] == pytest.approx(164 / 25, rel=0.02)


@pytest.mark.parametrize("name", ["decord_video_90.mov", "decord_unordered.mov", "mma_test.mp4"])
def test_a_sound_mp4_or_mov_has_no_header_problem(name):
    """QuickTime files carry a second ``hdlr`` (the data handler, 'url ') inside ``minf``;
    only the media handler (in ``mdia``) says what a track holds."""
    from jobs.commands.demo import SAMPLES
    from operators.decode import mp4_problem

    data = (SAMPLES / name).read_bytes()
    assert mp4_problem(lambda a, b: data[a:b], len(data)) is None
