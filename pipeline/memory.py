"""How much memory an annotator actor needs, and what Ray is told (``memory=``).

The parts, measured with ``vidprune bench-memory`` (docs/MEMORY.md): the actor's runtime,
its model's weights, and per stream the model's working memory (a step's activations and
the pruning method's state), a decoder child, and frame-sized buffers at the resolution of
the videos. Ray's ``memory`` is a reservation for scheduling, not a limit; the estimate keeps
actors from being packed onto a node that cannot hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: The actor process before its model: Python, torch, pyarrow, s3fs, Ray's worker, vidprune.
ACTOR_RUNTIME_BYTES = 600 << 20
#: A decoder child before frames: Python, numpy, PyAV and FFmpeg.
DECODER_BYTES = 64 << 20
#: Frame-sized buffers per stream at the video's resolution: ~8 in the decoder child
#: (FFmpeg's reference frames, the RGB conversion), 4 ring slots, ~31 in the actor (the frame,
#: and its float copies at full resolution while it is resized).
FRAME_BUFFERS = 44
#: More frame-sized buffers per stream with ``decode.backend: decord``: its thread decodes a
#: whole batch ahead (docs/MEMORY.md: child peak 1,367 against 97 MiB for PyAV on 1080p,
#: i.e. 1,270 MiB / 5.93 MiB per frame).
DECORD_FRAME_BUFFERS = 214
#: Weights are held twice while a checkpoint loads (the file's tensors and the model's).
WEIGHT_COPIES = 2
#: Model memory per stream, in float32 values: (a, b, which) = a x tokens through the blocks
#: x width, plus b x attention matrices (tokens^2 x heads) of the ``global`` blocks summed (a
#: method that keeps them between frames) or of the ``largest`` block (one at a time).
#: Fitted to vitdet-b at 512 and 1024 px; methods not measured get eventful's (the largest).
STREAM_STATE = {"none": (2.0, 1.0, "largest"), "eventful": (16.0, 2.3, "global")}


@dataclass(frozen=True)
class ModelSize:
    """What an actor's memory depends on, from the model as built on the driver."""

    weights_bytes: int = 0
    token_channels: float = 0.0      # tokens through the blocks in a dense step x width
    attention_global: float = 0.0    # sum of tokens^2 x heads over global-attention blocks
    attention_largest: float = 0.0   # the largest block's attention matrices


def stream_model_bytes(size: ModelSize, method: str) -> float:
    a, b, which = STREAM_STATE.get(method, STREAM_STATE["eventful"])
    attention = size.attention_global if which == "global" else size.attention_largest
    return 4.0 * (a * size.token_channels + b * attention)


def actor_memory_bytes(size: ModelSize, method: str, frame_bytes: int, streams: int,
                       backend: str = "pyav") -> int:
    """Memory one annotator actor needs, its decoder children included (Ray's ``memory=``
    for the actor). ``frame_bytes``: the largest RGB frame of the job's videos; ``backend``:
    the decoder (``decode.backend``)."""
    buffers = FRAME_BUFFERS + (DECORD_FRAME_BUFFERS if backend == "decord" else 0)
    per_stream = (stream_model_bytes(size, method) + DECODER_BYTES + buffers * frame_bytes)
    return int(ACTOR_RUNTIME_BYTES + WEIGHT_COPIES * size.weights_bytes + streams * per_stream)


def model_size(runner: Any) -> ModelSize:
    """What an actor's memory depends on, from the model as built on the driver (a
    ``models.StreamRunner``)."""
    net = runner.model
    weights = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    try:
        ledger = runner.dense_ledger("clip" if runner.kind == "clip" else "frame")
        blocks = list(net.backbone.blocks)
        tokens = float(ledger.tokens.sum()) / max(1, len(blocks))  # per block
        per_block = []
        for block in blocks:
            window = int(getattr(block, "window", 0) or 0)
            reach = min(tokens, window * window) if window else tokens
            per_block.append((not window, tokens * reach * block.attn.num_heads))
        return ModelSize(int(weights), tokens * len(blocks) * float(net.backbone.dim),
                         sum(a for g, a in per_block if g), max(a for _, a in per_block))
    except Exception:  # a model without a ViT backbone: the weights alone
        return ModelSize(int(weights))


def actor_resources(name: str, r: Any, size: ModelSize | None, method: str,
                    manifest: Any, log: Callable[[str], None], backend: str = "pyav"
                    ) -> tuple[int, int | None]:
    """(actors, Ray ``memory=`` per actor) for a job: ``r`` is its ``resources`` section;
    the memory is ``r.memory_per_actor_gib``, or the estimate for this model and the largest
    frame of the job's videos (``manifest``), kept within what the cluster's nodes offer so
    that the actors can be scheduled; fewer actors run when they do not all fit."""
    from . import cluster

    if r.memory_per_actor_gib:
        memory = int(r.memory_per_actor_gib * 2 ** 30)
    else:
        sizes = [w * h * 3 for w, h, e in zip(manifest.column("width").to_pylist(),
                                               manifest.column("height").to_pylist(),
                                               manifest.column("probe_error").to_pylist())
                 if e is None]
        memory = actor_memory_bytes(size or ModelSize(), method,
                                    max(sizes, default=1920 * 1080 * 3), r.streams_per_actor,
                                    backend)
    try:
        nodes = cluster.node_memory_bytes()
    except Exception:  # not connected (tests that call execute directly): no limits known
        nodes = []
    if not nodes or not max(nodes):
        return r.actors, memory
    if memory > max(nodes):
        log(f"{name}: an actor needs about {memory / 2 ** 30:.1f} GiB (estimate, "
            f"docs/MEMORY.md) but the largest node offers {max(nodes) / 2 ** 30:.1f} GiB; "
            "asking for that much (set resources.memory_per_actor_gib to decide)")
        memory = int(max(nodes))
    fit = int(sum(n // memory for n in nodes))
    if fit < r.actors:
        log(f"{name}: {r.actors} actors of {memory / 2 ** 30:.1f} GiB do not fit "
            f"the cluster's memory; running {max(1, fit)}")
    return max(1, min(r.actors, fit)), memory
