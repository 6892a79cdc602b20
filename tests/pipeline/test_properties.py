"""Properties, over generated input (hypothesis): spec validation only ever answers with the
spec's own error (every problem at a key path), whatever the data; the segment manifest
covers every frame of every video exactly once, with unique, stable ids, whatever the names
and numbers."""

import math
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jobs.errors import UserError
from jobs.spec import SpecError, parse_overrides, validate_spec
from operators.decode import sampled_indices, sampling_ratio
from pipeline.manifest import build_manifest, segment_id, video_id

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "..", "../../etc/passwd", "s3://", "s3://b", "s3://B_ad/x",
                     "s3://bucket/a/../b", "s3://bucket/x?X-Amz-Signature=1", "file://",
                     "ftp://x/y", "https://u:p@host", "minio:9000", "http://127.0.0.1:1",
                     "\x00", "a\nb", "💥" * 30, "${HOME}", "$(rm -rf /)", "%2e%2e/",
                     "!!python/object/apply:os.system", "eventful", "none", "vitdet-ti",
                     "*.mp4", "nan", "inf", "-1", "1e400"]))
scalars = st.one_of(st.none(), st.booleans(),
                    st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
                    st.floats(allow_nan=True, allow_infinity=True), hostile_text)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=12)

# The spec's own keys, so that generated specs get past the top level and into each section.
KEYS = {
    "name": None,
    "input": {"uri": None, "patterns": None, "storage": {"endpoint_url": None, "region": None,
                                                         "anon": None}},
    "model": {"task": None, "name": None, "arch": None, "checkpoint": None, "options": None,
              "labels": None, "input_size": None, "score_threshold": None, "dtype": None,
              "top_k": None},
    "pruning": {"method": None, "r": None, "policy": None, "threshold": None},
    "decode": {"fps": None, "segment_frames": None, "clip_frames": None,
               "frame_stride": None, "timeout_s": None, "retries": None, "backend": None},
    "resources": {"actors": None, "gpus_per_actor": None, "cpus_per_actor": None,
                  "streams_per_actor": None},
    "output": {"uri": None, "mode": None, "storage": None},
}


def section(tree):
    if tree is None:
        return values
    return st.one_of(values, st.fixed_dictionaries(
        {}, optional={k: section(v) for k, v in tree.items()}).flatmap(
        lambda d: st.dictionaries(hostile_text, values, max_size=2).map(
            lambda extra: {**extra, **d})))


specs = st.one_of(values, section(KEYS))


def valid_base():
    return {"input": {"uri": "s3://bucket/videos"}, "output": {"uri": "/tmp/out"},
            "model": {"arch": "vitdet-ti", "checkpoint": "/w.safetensors"},
            "pruning": {"method": "none"}}


def check(data):
    try:
        spec = validate_spec(data)
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and isinstance(m, str) and m
                                    for p, m in exc.problems)
        return None
    again = validate_spec(spec.as_dict())  # job.json holds a spec that validates again
    assert again == spec
    return spec


@SETTINGS
@given(specs)
def test_any_data_is_a_spec_or_a_spec_error(data):
    check(data)


@SETTINGS
@given(st.sampled_from([("input", "uri"), ("output", "uri"), ("name",), ("decode", "fps"),
                        ("decode", "segment_frames"), ("decode", "timeout_s"),
                        ("resources", "actors"), ("resources", "gpus_per_actor"),
                        ("model", "score_threshold"), ("model", "input_size"),
                        ("model", "checkpoint"), ("model", "labels"), ("pruning", "method"),
                        ("input", "patterns"), ("input", "storage", "endpoint_url"),
                        ("input", "storage"), ("output", "mode"), ("model", "top_k")]),
       values)
def test_one_hostile_value_in_a_valid_spec_is_reported_at_its_key(path, value):
    data = valid_base()
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    spec = check(data)
    if spec is None:
        return
    # Accepted values are sane: finite, in range, URIs without tricks.
    assert math.isfinite(spec.decode.timeout_s) and spec.decode.timeout_s > 0
    assert spec.decode.fps is None or 0 < spec.decode.fps <= 1000
    assert 1 <= spec.resources.actors <= 100_000
    for uri in (spec.input.uri, spec.output.uri):
        assert "\n" not in uri and "\x00" not in uri
        if uri.startswith("s3://"):
            key = uri[5:].partition("/")[2]
            assert ".." not in key.split("/") and "?" not in uri


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=4))
def test_overrides_parse_or_say_why(items):
    try:
        parsed = parse_overrides(items)
    except UserError as exc:
        assert str(exc).startswith("--set ")
        return
    assert all(isinstance(path, list) and all(path) for path, _ in parsed)


# -- the manifest -----------------------------------------------------------------------------

names = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from([
    "a b.mp4", "../../x.mp4", "x/../y.mp4", "ünï 視頻.mp4", "a\nb.mp4", "a\x00b", "%2F..%2F",
    "s3://bucket/a.mp4", "/abs/path.mp4", "C:\\\\x.mp4", "a//b.mp4", "" + "x" * 300]))


@st.composite
def probes(draw):
    videos = []
    for uri in draw(st.lists(names, min_size=1, max_size=6, unique=True)):
        failed = draw(st.booleans()) and draw(st.booleans())
        frames = draw(st.integers(min_value=0, max_value=20_000))
        videos.append({
            "uri": uri, "identity": draw(st.sampled_from(["etag:1", "size:9:mtime:3", ""])),
            "size_bytes": draw(st.integers(min_value=0, max_value=2 ** 62)),
            "frames_total": frames, "fps": draw(st.sampled_from([0.0, 1.0, 23.976, 30.0,
                                                                 240.0])),
            "width": 64, "height": 48, "duration_s": 1.0,
            "probe_error": draw(hostile_text.filter(bool)) if failed else None,
        })
    return videos


@SETTINGS
@given(probes(), st.integers(min_value=1, max_value=5000),
       st.sampled_from([None, 0.5, 1.0, 5.0, 29.97, 1000.0]), st.integers(1, 8))
def test_every_frame_is_in_exactly_one_segment_with_stable_unique_ids(videos, segment_frames,
                                                                      fps, stride):
    assume(sum(-(-v["frames_total"] // segment_frames) for v in videos) < 3000)
    table = build_manifest(videos, segment_frames, "fp", fps=fps, frame_stride=stride)
    rows = table.to_pylist()
    ids = [r["segment_id"] for r in rows]
    assert len(ids) == len(set(ids))
    for v in videos:
        mine = sorted((r for r in rows if r["uri"] == v["uri"]),
                      key=lambda r: r["segment_index"])
        assert mine and {r["video_id"] for r in mine} == {video_id(v["uri"])}
        if v["probe_error"] or v["frames_total"] == 0:
            # An unreadable video (or one without frames) is one row, without segments.
            assert len(mine) == 1 and mine[0]["segments_total"] == 0 and mine[0]["probe_error"]
            continue
        covered = [f for r in mine for f in range(r["start_frame"], r["end_frame"])]
        assert covered == list(range(v["frames_total"]))  # each frame once, in order
        assert all(r["segments_total"] == len(mine) for r in mine)
        assert all(0 < r["end_frame"] - r["start_frame"] <= segment_frames for r in mine)
        ratio = sampling_ratio(v["fps"], fps, stride)
        assert sum(r["frames_expected"] for r in mine) == len(
            sampled_indices(0, v["frames_total"], ratio))
    # The longest work first, unreadable videos last.
    runnable = [r for r in rows if not r["probe_error"]]
    assert [r["frames_expected"] for r in runnable] == sorted(
        (r["frames_expected"] for r in runnable), reverse=True)
    assert rows[len(runnable):] == [r for r in rows if r["probe_error"]]
    # Stable: the same probes in another order give the same rows.
    shuffled = list(videos)
    random.Random(0).shuffle(shuffled)
    again = build_manifest(shuffled, segment_frames, "fp", fps=fps, frame_stride=stride)
    assert sorted(again.column("segment_id").to_pylist()) == sorted(ids)


@SETTINGS
@given(names, names, st.integers(0, 10 ** 6), st.integers(0, 10 ** 6))
def test_ids_depend_on_exactly_what_names_the_work(uri_a, uri_b, start, length):
    end = start + length
    a = segment_id("fp", uri_a, "etag:1", start, end)
    assert a == segment_id("fp", uri_a, "etag:1", start, end)
    assert len(a) == 24 and all(c in "0123456789abcdef" for c in a)  # safe as a file name
    if uri_a != uri_b:
        assert a != segment_id("fp", uri_b, "etag:1", start, end)
        assert video_id(uri_a) != video_id(uri_b)
    assert a != segment_id("fp2", uri_a, "etag:1", start, end)
    assert a != segment_id("fp", uri_a, "etag:2", start, end)
    assert a != segment_id("fp", uri_a, "etag:1", start, end + 1)


def test_a_video_without_frames_is_a_row_not_a_disappearance():
    table = build_manifest([{"uri": "/v.mp4", "identity": "x", "size_bytes": 1,
                             "frames_total": 0, "fps": 30.0, "width": 1, "height": 1,
                             "duration_s": 0.0, "probe_error": None}], 16, "fp")
    assert table.num_rows == 1 and table.column("probe_error")[0].as_py() == "no video frames"


@pytest.mark.parametrize("uri", ["s3://bucket/a/../b", "s3://bucket/a//b", "s3://b/x",
                                 "s3://bu cket/x", "s3://bucket/./x", "/tmp/x\ny"])
def test_tricky_uris_are_refused(uri):
    data = valid_base()
    data["input"]["uri"] = uri
    with pytest.raises(SpecError) as info:
        validate_spec(data)
    assert "input.uri" in dict(info.value.problems)
