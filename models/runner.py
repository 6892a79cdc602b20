"""Running a model with a pruning method over streams of frames.

This is the one interface the pipeline uses::

    runner = StreamRunner(model, build_method("eventful", r=256))
    state = runner.new_state(batch=4)          # four streams (videos or segments), fresh
    for frames in ...:                         # frame t of each stream, in order
        outs = runner.step(frames, state)      # predictions + the work each stream ran
    outs = runner.finish(state)                # a recognizer's last partial clip, if any
    state = runner.select(state, keep)         # streams that end early leave the batch

The streams of one state start together (frame 0 is the first frame of every stream) and run
in lockstep; a stream that ends leaves with :meth:`select`. Everything carried from frame to
frame lives in the state, never in the model, so a state never leaks between videos.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .heads import Detections
from .ledger import Ledger
from .methods import Method, MethodState, StepContext

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class ClipResult:
    """One recognised clip: class probabilities and the positions (0-based, among the frames
    given to :meth:`StreamRunner.step`) of its first and last frame."""

    probs: torch.Tensor  # (classes,)
    first_step: int
    last_step: int
    padded: bool = False  # the stream ended before the clip was full; last frame repeated


@dataclass
class StepOutput:
    """What one stream got from one step. MACs are per stream, in GMACs."""

    detections: Detections | None = None
    clips: list[ClipResult] = field(default_factory=list)
    gmacs_run: float = 0.0        # backbone + method overhead actually executed
    gmacs_dense: float = 0.0      # the same backbone work run densely
    gmacs_overhead: float = 0.0   # the method's own share of gmacs_run
    gmacs_padding: float = 0.0    # run on this stream's padding rows in a ragged batch
    gmacs_head: float = 0.0       # head (+ neck) work, outside the backbone figure
    gmacs_embed: float = 0.0      # patch embedding, outside the backbone figure
    tokens_run: float = 0.0
    tokens_dense: float = 0.0


@dataclass
class RunnerState:
    batch: int
    method: MethodState
    steps: int = 0                                     # frames given to each stream so far
    clip_frames: list[list[torch.Tensor]] = field(default_factory=list)   # clip models
    clip_embeddings: list[list[torch.Tensor]] = field(default_factory=list)  # ViViT
    pending: list[torch.Tensor] = field(default_factory=list)  # frames of an open tubelet (B,3,H,W)
    clip_start: list[int] = field(default_factory=list)
    clips_done: list[int] = field(default_factory=list)


class StreamRunner:
    """A model and a pruning method, ready to step batches of streams.

    ``score_threshold``: detections below it are dropped. ``input_size``: the square input
    resolution (default: the model's).
    """

    def __init__(self, model: nn.Module, method: Method, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, score_threshold: float = 0.3,
                 input_size: int | None = None):
        self.input_size = int(input_size or getattr(model, "input_size", 224))
        method.check(model, self.input_size)
        self.model = model.eval().to(device=device, dtype=dtype)
        self.method = method
        self.device = torch.device(device)
        self.dtype = dtype
        self.score_threshold = score_threshold
        self.task = model.task
        self.kind = model.kind
        self.clip_frames = getattr(model, "clip_frames", 0)
        self.tubelet = int(getattr(model, "tubelet", 1))  # frames per step of a frame model
        self.clip_steps = int(getattr(model, "clip_steps", self.clip_frames))
        patch = model.backbone.patch
        if self.input_size % patch:
            raise ValueError(f"input size {self.input_size} is not a multiple of the patch "
                             f"size {patch}")
        mean = getattr(model, "pixel_mean", IMAGENET_MEAN)
        std = getattr(model, "pixel_std", IMAGENET_STD)
        self._mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(3, 1, 1)
        self._dense: dict[str, Ledger] = {}

    # -- state -------------------------------------------------------------------------------
    def new_state(self, batch: int) -> RunnerState:
        """A fresh state for ``batch`` streams that start now."""
        return RunnerState(
            batch=batch, method=self.method.new_state(self.model.backbone, batch),
            clip_frames=[[] for _ in range(batch)], clip_embeddings=[[] for _ in range(batch)],
            clip_start=[0] * batch, clips_done=[0] * batch)

    def select(self, state: RunnerState, keep: Sequence[int]) -> RunnerState:
        """The state of the streams ``keep`` only (in that order)."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        return RunnerState(
            batch=len(index), method=state.method.select(index), steps=state.steps,
            clip_frames=[state.clip_frames[i] for i in keep],
            clip_embeddings=[state.clip_embeddings[i] for i in keep],
            clip_start=[state.clip_start[i] for i in keep],
            clips_done=[state.clips_done[i] for i in keep],
            pending=[p.index_select(0, index.to(p.device)) for p in state.pending])

    # -- preprocessing -----------------------------------------------------------------------
    # Frames of one size are preprocessed together: one host-to-device copy and one resize per
    # size, not one per stream (on a GPU, per-stream work is launch overhead). Each image is
    # computed exactly as it would be alone.
    def _by_size(self, frames: Sequence[np.ndarray | torch.Tensor]
                 ) -> list[tuple[list[int], torch.Tensor]]:
        """Stream indices and their frames as one (n, 3, H, W) float tensor on the device,
        per frame size (in order of first appearance)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, frame in enumerate(frames):
            shape = tuple(frame.shape)
            if len(shape) != 3 or shape[-1] != 3:
                raise ValueError(f"expected an (H, W, 3) RGB frame, got shape {shape}")
            groups.setdefault(shape, []).append(i)
        out = []
        for idx in groups.values():
            host = torch.stack([torch.as_tensor(frames[i]) for i in idx])
            out.append((idx, host.to(self.device).permute(0, 3, 1, 2).float()))
        return out

    def preprocess_detections(self, frames: Sequence[np.ndarray | torch.Tensor]
                              ) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
        """Resize each frame's longest side to the input size, normalise, pad bottom/right to
        square. Returns the images (B, 3, S, S), the scale applied to each and its resized
        (h, w)."""
        r = self.input_size
        images = torch.zeros(len(frames), 3, r, r, device=self.device)
        scales: list[float] = [1.0] * len(frames)
        sizes: list[tuple[int, int]] = [(r, r)] * len(frames)
        for idx, img in self._by_size(frames):
            h, w = img.shape[-2:]
            scale = r / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            if (nh, nw) != (h, w):
                img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False,
                                    antialias=scale < 1)
            img = (img - self._mean) / self._std
            if len(idx) == len(frames):
                images[:, :, :nh, :nw] = img
            else:
                images[torch.as_tensor(idx, device=self.device), :, :nh, :nw] = img
            for i in idx:
                scales[i], sizes[i] = scale, (nh, nw)
        return images, scales, sizes

    def preprocess_detection(self, frame: np.ndarray | torch.Tensor
                             ) -> tuple[torch.Tensor, float, tuple[int, int]]:
        """One frame of :meth:`preprocess_detections`: the image (3, S, S), scale, (h, w)."""
        images, scales, sizes = self.preprocess_detections([frame])
        return images[0], scales[0], sizes[0]

    def preprocess_recognitions(self, frames: Sequence[np.ndarray | torch.Tensor]
                                ) -> torch.Tensor:
        """Resize each frame's shorter side to the input size, centre crop, normalise:
        (B, 3, S, S)."""
        r = self.input_size
        images = torch.empty(len(frames), 3, r, r, device=self.device)
        for idx, img in self._by_size(frames):
            h, w = img.shape[-2:]
            scale = r / min(h, w)
            nh, nw = max(r, round(h * scale)), max(r, round(w * scale))
            img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False,
                                antialias=scale < 1)
            top, left = (nh - r) // 2, (nw - r) // 2
            img = (img[:, :, top:top + r, left:left + r] - self._mean) / self._std
            if len(idx) == len(frames):
                images.copy_(img)
            else:
                images[torch.as_tensor(idx, device=self.device)] = img
        return images

    def preprocess_recognition(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One frame of :meth:`preprocess_recognitions`: (3, S, S)."""
        return self.preprocess_recognitions([frame])[0]

    # -- dense reference ---------------------------------------------------------------------
    def dense_ledger(self, what: str) -> Ledger:
        """MACs the same model executes densely for one ``frame`` or one ``clip`` (counted by
        running the dense path once on the meta device: shapes only, no arithmetic)."""
        if what not in self._dense:
            meta = _meta_copy(self.model)
            led = Ledger(1)
            r = self.input_size
            if self.kind == "frame":
                chans = meta.backbone.patch_embed.proj.in_channels  # 3 x frames per step
                e = meta.backbone.embed(torch.zeros(1, chans, r, r, device="meta"), led)
                meta.backbone.forward_blocks(e.tokens, e.grid, led)
                if what == "clip":  # ViViT: the temporal model over a clip of step embeddings
                    led = Ledger(1)
                    meta.forward_temporal(torch.zeros(1, self.clip_steps, meta.backbone.dim,
                                                      device="meta"), led)
            else:
                e = meta.backbone.embed(
                    torch.zeros(1, 3, self.clip_frames, r, r, device="meta"), led)
                meta.backbone.forward_blocks(e.tokens, e.grid, led)
            self._dense[what] = led
        return self._dense[what]

    # -- stepping ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, frames: Sequence[np.ndarray | torch.Tensor], state: RunnerState
             ) -> list[StepOutput]:
        """Frame ``state.steps`` of every stream (RGB uint8, any size; one per stream)."""
        if len(frames) != state.batch:
            raise ValueError(f"got {len(frames)} frames for {state.batch} streams")
        if self.kind == "clip":
            outs = self._step_clip_model(frames, state)
        else:
            outs = self._step_frame_model(frames, state)
        state.steps += 1
        return outs

    @torch.inference_mode()
    def finish(self, state: RunnerState, streams: Sequence[int] | None = None
               ) -> list[StepOutput]:
        """End streams (all by default). A recognizer stream that has not completed a single
        clip gets one from its frames so far, the last frame repeated to fill it (a
        factorised model: its unfinished time step filled with the last frame, then its last
        time step repeated); otherwise a partial trailing clip is dropped. Returns one output
        per ended stream."""
        streams = list(range(state.batch)) if streams is None else list(streams)
        outs = [StepOutput() for _ in streams]
        if self.task != "recognition":
            return outs
        todo = [j for j, i in enumerate(streams)
                if state.clips_done[i] == 0
                and (state.clip_frames[i] or state.clip_embeddings[i] or state.pending)]
        for j in todo:
            i = streams[j]
            if self.kind == "clip":
                frames = state.clip_frames[i]
                state.clip_frames[i] = frames + [frames[-1]] * (self.clip_frames - len(frames))
                self._run_clips([i], state, [outs[j]], padded=True)
            else:
                if state.pending:  # frames of an unfinished time step: complete it
                    self._finish_tubelet(i, state, outs[j])
                emb = state.clip_embeddings[i]  # then repeat the last time step
                state.clip_embeddings[i] = emb + [emb[-1]] * (self.clip_steps - len(emb))
                self._run_temporal([i], state, [outs[j]], padded=True)
        return outs

    def _step_frame_model(self, frames, state: RunnerState) -> list[StepOutput]:
        b = state.batch
        if self.task == "detection":
            images, scales, sizes = self.preprocess_detections(frames)
            images = images.to(self.dtype)
        else:
            sizes = None
            images = self.preprocess_recognitions(frames).to(self.dtype)
            if self.tubelet > 1:  # a step of the model is a tubelet of frames: wait for them
                state.pending.append(images)
                if len(state.pending) < self.tubelet:
                    return [StepOutput() for _ in range(b)]
                images = torch.stack(state.pending, dim=2).flatten(1, 2)  # (colour, frame)
                state.pending = []
        ledger = Ledger(b)
        emb = self.model.backbone.embed(images, ledger)
        valid = _valid_tokens(emb.grid, sizes, self.model.backbone.patch,
                              self.device) if sizes else None
        ctx = StepContext(valid=valid, first=state.steps < self.tubelet,
                          input_size=tuple(images.shape[-2:]))
        tokens = self.method.forward(self.model.backbone, emb, state.method, ledger, ctx)
        outs = [StepOutput() for _ in range(b)]
        if self.task == "detection":
            dets = self.model.forward_head(tokens[:, emb.prefix:], emb.grid, ledger, images,
                                           score_threshold=min(self.score_threshold, 0.05),
                                           image_sizes=sizes)
            if self.method.uses_predictions:
                self.method.observe(state.method, dets, ctx)
            sizes_of = [(f.shape[0], f.shape[1]) for f in frames]
            for out, d in zip(outs, frame_detections(dets, scales, sizes_of,
                                                     self.score_threshold)):
                out.detections = d
        elif self.task == "recognition":
            emb_cls = self.model.frame_embedding(tokens)
            ready = []
            for i in range(b):
                if not state.clip_embeddings[i]:
                    state.clip_start[i] = state.steps - (self.tubelet - 1)
                state.clip_embeddings[i].append(emb_cls[i])
                if len(state.clip_embeddings[i]) == self.clip_steps:
                    ready.append(i)
            if ready:
                self._run_temporal(ready, state, [outs[i] for i in ready])
        else:
            raise ValueError(f"task {self.task!r} is not supported on streams")
        self._account(outs, ledger, self.dense_ledger("frame"))
        return outs

    def _finish_tubelet(self, i: int, state: RunnerState, out: StepOutput) -> None:
        """Stream ``i`` ends in the middle of a tubelet: repeat its last frame to fill it, and
        run the spatial model on it (the clip's last time step)."""
        frames = [p[i] for p in state.pending]
        frames += [frames[-1]] * (self.tubelet - len(frames))
        images = torch.stack(frames, dim=1).flatten(0, 1)[None]  # (1, 3 * tubelet, H, W)
        ledger = Ledger(1)
        emb = self.model.backbone.embed(images, ledger)
        ctx = StepContext(valid=None, first=True, input_size=tuple(images.shape[-2:]))
        sub_state = state.method.select(torch.as_tensor([i]))
        tokens = self.method.forward(self.model.backbone, emb, sub_state, ledger, ctx)
        if not state.clip_embeddings[i]:
            state.clip_start[i] = state.steps - len(state.pending)
        state.clip_embeddings[i].append(self.model.frame_embedding(tokens)[0])
        self._account([out], ledger, self.dense_ledger("frame"))

    def _run_temporal(self, streams: list[int], state: RunnerState, outs: list[StepOutput],
                      padded: bool = False) -> None:
        """The temporal model over the finished clips of ``streams`` (``outs`` aligned)."""
        seq = torch.stack([torch.stack(state.clip_embeddings[i]) for i in streams])
        ledger = Ledger(len(streams))
        logits = self.model.forward_temporal(seq, ledger)
        self._emit_clips(streams, state, outs, logits, padded)
        self._account(outs, ledger, self.dense_ledger("clip"))
        for i in streams:
            state.clip_embeddings[i] = []

    def _step_clip_model(self, frames, state: RunnerState) -> list[StepOutput]:
        b = state.batch
        outs = [StepOutput() for _ in range(b)]
        ready = []
        images = self.preprocess_recognitions(frames).to(self.dtype)
        for i in range(b):
            if not state.clip_frames[i]:
                state.clip_start[i] = state.steps
            state.clip_frames[i].append(images[i])
            if len(state.clip_frames[i]) == self.clip_frames:
                ready.append(i)
        if ready:
            self._run_clips(ready, state, [outs[i] for i in ready])
        return outs

    def _run_clips(self, streams: list[int], state: RunnerState, outs: list[StepOutput],
                   padded: bool = False) -> None:
        clips = torch.stack([torch.stack(state.clip_frames[i], dim=1) for i in streams])
        ledger = Ledger(len(streams))
        emb = self.model.backbone.embed(clips, ledger)
        ctx = StepContext(valid=None, first=True, input_size=tuple(clips.shape[-2:]))
        sub_state = state.method if len(streams) == state.batch else \
            state.method.select(torch.as_tensor(streams))
        tokens = self.method.forward(self.model.backbone, emb, sub_state, ledger, ctx)
        logits = self.model.forward_head(tokens, ledger)
        self._emit_clips(streams, state, outs, logits, padded)
        self._account(outs, ledger, self.dense_ledger("clip"))
        for i in streams:
            state.clip_frames[i] = []

    def _emit_clips(self, streams, state, outs, logits, padded) -> None:
        probs = logits.float().softmax(-1).cpu()
        for j, i in enumerate(streams):
            last = state.steps if not padded else state.steps - 1
            outs[j].clips.append(ClipResult(probs[j], state.clip_start[i], last, padded))
            state.clips_done[i] += 1

    @staticmethod
    def _account(outs: list[StepOutput], ledger: Ledger, dense: Ledger) -> None:
        # as Python lists first: indexing the tensors stream by stream cost two operator
        # calls per figure and stream
        run = ledger.run_macs().tolist()
        overhead, padding, head, embed = (ledger.macs[k].tolist() for k in (
            "overhead", "padding", "head", "patch_embed"))
        tokens = ledger.tokens.tolist()
        dense_run, dense_tokens = float(dense.run_macs()[0]), float(dense.tokens[0])
        for i, o in enumerate(outs):
            o.gmacs_run += run[i] / 1e9
            o.gmacs_overhead += overhead[i] / 1e9
            o.gmacs_padding += padding[i] / 1e9
            o.gmacs_head += head[i] / 1e9
            o.gmacs_embed += embed[i] / 1e9
            o.gmacs_dense += dense_run / 1e9
            o.tokens_run += tokens[i]
            o.tokens_dense += dense_tokens


def frame_detections(dets: Sequence[Detections], scales: Sequence[float],
                     frame_sizes: Sequence[tuple[int, int]],
                     score_threshold: float) -> list[Detections]:
    """Each stream's detections in input pixels to its frame's pixels, on the CPU: those
    scoring at least ``score_threshold``, boxes divided by the stream's scale and clipped to
    its frame (height, width). A box with no area left inside the frame is dropped: it covers
    no pixel of it. All streams are converted together (a few operator calls per frame, not
    a dozen per stream)."""
    b = len(dets)
    counts = torch.tensor([len(d.scores) for d in dets])
    stream = torch.repeat_interleave(torch.arange(b), counts)
    boxes = torch.cat([d.boxes for d in dets]).cpu().float()
    scores = torch.cat([d.scores for d in dets]).cpu().float()
    labels = torch.cat([d.labels for d in dets]).cpu()
    scale = torch.tensor(scales, dtype=torch.float32)[stream, None]
    height, width = torch.tensor(frame_sizes, dtype=torch.float32)[stream].unbind(1)
    bound = torch.stack([width, height, width, height], dim=1)
    boxes = torch.minimum((boxes / scale).clamp(min=0), bound)
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = (scores >= score_threshold) & inside
    kept = torch.bincount(stream[keep], minlength=b).tolist()
    return [Detections(*parts) for parts in zip(boxes[keep].split(kept), scores[keep].split(kept),
                                                labels[keep].split(kept))]


def _valid_tokens(grid, sizes, patch: int, device) -> torch.Tensor:
    """(B, N) True where a token covers resized image pixels rather than square padding."""
    h, w = grid
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    extent = torch.tensor([[math.ceil(nh / patch), math.ceil(nw / patch)] for nh, nw in sizes])
    valid = (rows < extent[:, 0, None, None]) & (cols < extent[:, 1, None, None])
    return valid.flatten(1).to(device)


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same architecture on the meta device (no memory, no arithmetic)."""
    from .registry import build_arch

    arch = getattr(model, "arch", None)
    if arch is not None and hasattr(model, "build_options"):
        with torch.device("meta"):
            return build_arch(arch.name, class_names=model.class_names, **model.build_options)
    return copy.deepcopy(model).to("meta")
