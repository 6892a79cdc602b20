"""What Ray is told an annotator actor needs (``memory=``): the estimate's parts follow the
model and the frames, and the request always fits the cluster (docs/MEMORY.md)."""

from types import SimpleNamespace

import pyarrow as pa
import pytest

from models import StreamRunner, build_arch, build_method
from pipeline.memory import (ACTOR_RUNTIME_BYTES, DECORD_FRAME_BUFFERS, FRAME_BUFFERS, ModelSize,
                             actor_memory_bytes, actor_resources, model_size)


def test_the_model_size_comes_from_the_model_as_built():
    model = build_arch("vitdet-ti", input_size=64, depth=2, dim=32, heads=2, neck_channels=16)
    size = model_size(StreamRunner(model, build_method("none")))
    params = sum(p.numel() * 4 for p in model.parameters())
    assert params <= size.weights_bytes <= params + sum(b.numel() * 8 for b in model.buffers())
    tokens = (64 // 16) ** 2
    assert size.token_channels == pytest.approx(tokens * 2 * 32)
    # One of the two blocks attends globally (4 x 4 tokens, 2 heads).
    assert size.attention_largest == pytest.approx(tokens * tokens * 2)
    assert size.attention_global >= size.attention_largest


def test_the_estimate_grows_with_streams_frames_and_state():
    size = ModelSize(100 << 20, 10e6, 50e6, 20e6)
    one = actor_memory_bytes(size, "none", 1920 * 1080 * 3, 1)
    assert one > ACTOR_RUNTIME_BYTES + 2 * (100 << 20)
    two = actor_memory_bytes(size, "none", 1920 * 1080 * 3, 2)
    uhd = actor_memory_bytes(size, "none", 3840 * 2160 * 3, 1)
    assert uhd - one == FRAME_BUFFERS * 3 * 1920 * 1080 * 3
    assert two - one == one - ACTOR_RUNTIME_BYTES - 2 * (100 << 20)
    # Eventful keeps its global blocks' attention between frames; methods not yet measured
    # get the larger of the two.
    assert actor_memory_bytes(size, "eventful", 0, 1) > actor_memory_bytes(size, "none", 0, 1)
    assert actor_memory_bytes(size, "stgt", 0, 1) == actor_memory_bytes(size, "eventful", 0, 1)
    # decord decodes a batch ahead in its child: more frames per stream
    frame = 1920 * 1080 * 3
    assert (actor_memory_bytes(size, "none", frame, 2, "decord")
            - actor_memory_bytes(size, "none", frame, 2)) == 2 * DECORD_FRAME_BUFFERS * frame


def test_the_request_fits_the_cluster(ray_session):
    import ray

    largest = max(float(n["Resources"].get("memory", 0)) for n in ray.nodes() if n["Alive"])
    manifest = pa.table({"width": [64, 1920], "height": [48, 1080],
                         "probe_error": [None, None]})
    notes = []
    small = SimpleNamespace(actors=2, streams_per_actor=1, memory_per_actor_gib=None)
    actors, memory = actor_resources("job", small, ModelSize(1 << 20), "none", manifest,
                                     notes.append)
    assert actors == 2 and memory == actor_memory_bytes(ModelSize(1 << 20), "none",
                                                        1920 * 1080 * 3, 1) and not notes
    half = SimpleNamespace(actors=5, streams_per_actor=1,
                           memory_per_actor_gib=0.45 * largest / 2 ** 30)
    actors, memory = actor_resources("job", half, None, "none", manifest, notes.append)
    assert actors == 2 and "do not fit the cluster's memory; running 2" in notes[-1]
    huge = SimpleNamespace(actors=1, streams_per_actor=1000, memory_per_actor_gib=None)
    actors, memory = actor_resources("job", huge, ModelSize(1 << 30, 1e9, 1e9, 1e9), "eventful",
                                     manifest, notes.append)
    assert actors == 1 and memory == int(largest) and "the largest node offers" in notes[-1]
