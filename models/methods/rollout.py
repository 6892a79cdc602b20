"""Rollout-guided token pruning (ICIP 2025, supplementary; docs/ARCHITECTURE.md, Methods).

Frame t runs only the K input tokens that mattered most to frame t-1's predictions:

1. importance at the output of frame t-1: the tokens under its boxes that score above
   ``score_threshold`` (detector; every real token when none does), or the class token
   (recognizer); ``s_L = anchors / |anchors|``;
2. attention rollout back to the input tokens through frame t-1's attention,
   ``s_l = A_{l+1}^T s_{l+1}`` with ``A_l = rownorm(fuse_heads(attn_l) + I)``, by matrix-vector
   products only (the paper's eq. 7);
3. token tracking: each token of frame t takes the importance of the frame t-1 token in its
   (2r+1)^2 neighbourhood whose patch embedding (before position encoding) matches it best by
   dot product; positions off the grid and square-padding tokens never win;
4. the top-K tokens by tracked importance (real pixels first) continue after block 0's
   attention and residual; the others stop there.

Detector (no class token): pruned tokens keep their place through caches, so the head gets a
dense map (supplementary B). Global blocks run the kept queries against a cache of the latest
keys and values of *every* token (fresh for kept tokens, stale for pruned ones). Windowed
blocks "compute the full attention computation ... to allow batch processing": the token-wise
ops (qkv, projection, MLP) run on kept tokens only, but the windowed attention runs on every
window and query from a cache of the latest q, k, v of every token; its cost is the dense
windowed attention and the outputs of pruned queries are thrown away. The last block's output
buffer keeps every token's latest output. Attention rows for the next frame's rollout: block 0
and windowed blocks compute every row each frame; global blocks compute the kept rows and keep
the pruned tokens' latest rows in a per-block cache.

Recognizer (ViViT's spatial model, class token): importance from the class-token row of the
rollout; pruned tokens are dropped after block 0 (no caches), so blocks 1.. attend among the
kept tokens only; ``background`` of the K tokens may be sampled evenly from the rest.

Frame 0 is dense, and so is every ``refresh``-th frame (caches rebuilt). A frame followed by a
dense one records nothing for the rollout; with ``refresh=1`` every frame is the dense model.

Which blocks the rollout goes through (``rollout_blocks``): the paper's eq. 6-7 use every block
(``all``, the default; a windowed block's matrix is block-diagonal over the windows of the
padded grid, so importance that flows to window padding is lost, there being no input token
there). The authors' code uses the global blocks only (``global``) and fuses heads by root
mean square (``fusion="rms"``; the paper's form is the mean).

Compute (ledger ``overhead``): head fusion (``heads`` ops per fused element, +1 for rms),
row sums of ``F + I``, the rollout's matrix-vector products with the division and identity
term, the tracking dot products ((2r+1)^2 N D) and the anchors' normalisation. Sorting,
gathers and scatters are not arithmetic and are not counted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..heads import Detections
from ..layers import Attention, Grid, rel_pos_terms_at, window_partition, window_unpartition
from ..ledger import Ledger
from ..vit import Embedded, ViT
from . import register
from .base import Method, MethodError, MethodState, StepContext

FUSIONS = ("mean", "rms")
ROLLOUT_BLOCKS = ("all", "global")


# --- pure parts ------------------------------------------------------------------------------

def fuse_heads(probs: torch.Tensor, fusion: str, ledger: Ledger | None = None,
               streams: int = 1) -> torch.Tensor:
    """Attention probabilities (b, heads, n, m) to one matrix (b, n, m): the heads' mean
    (paper) or root mean square (authors' code). ``streams``: how many streams ``b`` covers."""
    heads = probs.shape[1]
    if fusion == "mean":
        fused, per_element = probs.mean(1), heads
    elif fusion == "rms":
        fused, per_element = probs.square().mean(1).sqrt(), heads + 1
    else:
        raise ValueError(f"unknown head fusion {fusion!r}; expected one of {FUSIONS}")
    if ledger is not None:
        ledger.add(fused.numel() // streams * per_element, "overhead")
    return fused


def row_norms(fused: torch.Tensor, ledger: Ledger | None = None, streams: int = 1
              ) -> torch.Tensor:
    """Row sums of ``fused + I`` (what the rollout divides each row by)."""
    if ledger is not None:
        ledger.add(fused.numel() // streams, "overhead")
    return fused.sum(-1) + 1


def rollout_step(fused: torch.Tensor, norms: torch.Tensor, s: torch.Tensor,
                 ledger: Ledger | None = None) -> torch.Tensor:
    """``A^T s`` for ``A = (fused + I) / norms`` (row-normalised), without forming ``A``.

    ``fused`` (..., n, n), ``norms`` (..., n), ``s`` (..., n), leading dimension the streams.
    """
    u = s / norms.to(s.dtype)
    out = torch.einsum("...nm,...n->...m", fused.to(s.dtype), u) + u
    if ledger is not None:  # the product, plus the division and the identity term per row
        ledger.add(fused[0].numel() + 2 * norms[0].numel(), "overhead")
    return out


def rollout(s_last: torch.Tensor, attn: Sequence[torch.Tensor | None],
            norms: Sequence[torch.Tensor | None], windows: Sequence[int], grid: Grid,
            tokens: int, keep: torch.Tensor | None = None, ledger: Ledger | None = None
            ) -> torch.Tensor:
    """Importance of the input tokens (B, tokens) from importance ``s_last`` at the output of
    the last block, through the blocks whose fused attention ``attn[l]`` is given.

    ``attn[l]``: (B, n, n) for global attention (rows are queries), (B, nW, w*w, w*w) for a
    windowed block (``windows[l]`` = w; grid tokens only, no prefix); ``None`` for a block left
    out. ``keep`` (B, n) are the token indices blocks 1.. ran on when pruned tokens were
    dropped after block 0 (their importance past block 0 is zero).
    """
    s = s_last.to(torch.promote_types(s_last.dtype, torch.float32))
    b = s.shape[0]
    for layer in reversed(range(len(attn))):
        if layer == 0 and keep is not None:
            s = s.new_zeros(b, tokens).scatter(1, keep, s)
        fused = attn[layer]
        if fused is None:
            continue
        if fused.ndim == 4:
            w = windows[layer]
            prefix = s.shape[1] - grid[0] * grid[1]
            part, padded = window_partition(s[:, prefix:, None], grid, w, None)
            out = rollout_step(fused, norms[layer], part.view(fused.shape[:-1]), ledger)
            grid_s = window_unpartition(out.reshape(-1, w * w, 1), b, grid, padded, w)[..., 0]
            s = torch.cat([s[:, :prefix], grid_s], dim=1)
        else:
            s = rollout_step(fused, norms[layer], s, ledger)
    return s


def track(importance: torch.Tensor, prev_patches: torch.Tensor, prev_valid: torch.Tensor,
          patches: torch.Tensor, grid: Grid, radius: int, ledger: Ledger | None = None
          ) -> torch.Tensor:
    """Importance (B, N) carried from the previous frame's tokens to the current ones.

    Each current token takes the importance of the previous-frame token in its
    (2 radius + 1)^2 neighbourhood with the largest dot product of patch embeddings (B, N, D).
    Off-grid positions and previous-frame tokens with ``prev_valid`` False never win; a token
    with no candidate gets 0. Equal scores keep the token in place.
    """
    b, n, d = patches.shape
    h, w, r = grid[0], grid[1], radius
    cur = patches.float().view(b, h, w, d)
    prev = F.pad(prev_patches.float().view(b, h, w, d), (0, 0, r, r, r, r))
    imp = F.pad(importance.float().view(b, h, w), (r, r, r, r))
    ok = prev_valid.new_zeros(b, h + 2 * r, w + 2 * r, dtype=torch.bool)
    ok[:, r:r + h, r:r + w] = prev_valid.view(b, h, w)
    # the centre first: argmax takes the first of equal scores, so ties stay in place
    offsets = sorted(itertools.product(range(-r, r + 1), repeat=2), key=lambda o: o != (0, 0))
    sims, imps, oks = [], [], []
    for dy, dx in offsets:
        ys, xs = slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)
        # a product and a sum over channels: einsum made this 1764 tiny batched products
        # per offset on a strided slice (measured 18 ms vs 2 ms per offset, ViTDet-B at 672)
        sims.append((cur * prev[:, ys, xs]).sum(-1))
        imps.append(imp[:, ys, xs])
        oks.append(ok[:, ys, xs])
    candidates = torch.stack(oks, 1)
    sim = torch.stack(sims, 1).masked_fill(~candidates, float("-inf"))
    best = sim.argmax(1, keepdim=True)
    out = torch.stack(imps, 1).gather(1, best)[:, 0]
    out = torch.where(candidates.any(1), out, torch.zeros_like(out))
    if ledger is not None:
        ledger.matmul(len(offsets) * n, d, "overhead")
    return out.reshape(b, n)


def top_k(score: torch.Tensor, valid: torch.Tensor | None, k: int, background: int = 0
          ) -> torch.Tensor:
    """Indices (B, k), ascending, of the tokens to keep: the ``k - background`` highest
    ``score`` (>= 0) among real-pixel tokens first, then ``background`` tokens evenly spaced in
    raster order over the rest (real pixels first), as the authors' fixed-stride sampling.
    Padding tokens are kept only when there are fewer than ``k`` real ones."""
    b, n = score.shape
    key = score if valid is None else score.masked_fill(~valid, -1.0)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    fg = k - background
    keep = order[:, :fg]
    if background:
        rest = order[:, fg:]
        if valid is None:
            real = torch.full((b,), n - fg, device=score.device)
            raster = rest.sort(1).values
        else:
            pad = ~valid.gather(1, rest)
            raster = rest.gather(1, (rest + n * pad).argsort(1))  # real pixels, then padding
            real = (~pad).sum(1)
        spread = real.clamp(min=background)[:, None]
        pos = torch.arange(background, device=score.device)[None] * spread // background
        keep = torch.cat([keep, raster.gather(1, pos)], dim=1)
    return keep.sort(1).values


def paint_anchors(detections: Sequence[Detections], grid: Grid, input_size: tuple[int, int],
                  threshold: float, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, N) bool: tokens whose patch overlaps a box scoring above ``threshold`` (boxes in
    input pixels); a stream with no such box gets every real-pixel token. The boxes are
    painted where they are (the CPU, for a CenterNet head) and the result moved to ``valid``'s
    device once.

    All streams' boxes are painted together (a few operator calls per frame rather than a
    dozen per stream: at 32 streams the per-stream loop was about 3,800 calls a frame)."""
    h, w = grid
    ph, pw = input_size[0] / h, input_size[1] / w
    b = len(detections)
    boxes = torch.cat([d.boxes for d in detections]).float()
    scores = torch.cat([d.scores for d in detections])
    device = boxes.device
    stream = torch.repeat_interleave(
        torch.arange(b, device=device),
        torch.tensor([len(d.scores) for d in detections], device=device))
    above = scores > threshold
    boxes, stream = boxes[above], stream[above]
    x0 = torch.floor(boxes[:, 0] / pw).clamp(0, w - 1)
    y0 = torch.floor(boxes[:, 1] / ph).clamp(0, h - 1)
    x1 = torch.maximum(torch.ceil(boxes[:, 2] / pw).clamp(max=w), x0 + 1)
    y1 = torch.maximum(torch.ceil(boxes[:, 3] / ph).clamp(max=h), y0 + 1)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_y = (rows >= y0[:, None]) & (rows < y1[:, None])
    in_x = (cols >= x0[:, None]) & (cols < x1[:, None])
    cover = (in_y[:, :, None] & in_x[:, None, :]).flatten(1)  # (boxes, N)
    hits = torch.zeros(b, h * w, dtype=torch.int32, device=device)
    mask = hits.index_add_(0, stream, cover.to(torch.int32)) > 0
    if valid is None:
        real = torch.ones_like(mask)
    else:
        real = valid.to(torch.bool)
        mask = mask.to(real.device) & real
    return torch.where(mask.any(1, keepdim=True), mask, real)


# --- the method -------------------------------------------------------------------------------

@dataclass
class RolloutState(MethodState):
    """What rollout pruning carries from frame to frame, for a batch of streams (lockstep).

    Per-block lists are indexed by block and hold ``None`` where a block keeps nothing.
    """

    frame: int = 0                           # frames stepped since the streams started
    grid: Grid | None = None
    anchors: torch.Tensor | None = None      # (B, N) bool: tokens under last frame's boxes
    patches: torch.Tensor | None = None      # (B, N, D) last frame's patch embeddings
    valid: torch.Tensor | None = None        # (B, N) last frame's real-pixel tokens
    keep: torch.Tensor | None = None         # (B, P+K) tokens blocks 1.. ran on (recognizer)
    attn: list = field(default_factory=list)        # fused attention of the last frame
    attn_norms: list = field(default_factory=list)  # its row sums (+1 for the identity)
    cache: list = field(default_factory=list)       # global: (B, P+N, 2D) latest k, v;
    #                                                 windowed: (B, N, 3D) latest q, k, v
    output: torch.Tensor | None = None       # (B, P+N, D) latest output of every token

    def clear(self, depth: int) -> None:
        """Forget every cache (the next frame is dense)."""
        self.grid = self.anchors = self.patches = self.valid = self.keep = self.output = None
        self.attn, self.attn_norms, self.cache = [None] * depth, [None] * depth, [None] * depth


@register
class Rollout(Method):
    """Rollout-guided token pruning: see the module docstring."""

    name = "rollout"
    kinds = frozenset({"frame"})
    uses_predictions = True

    @dataclass
    class Params:
        k: int                        # grid tokens kept per pruned frame (static: batches)
        refresh: int = 8              # dense every `refresh` frames (0: frame 0 only)
        score_threshold: float = 0.1  # boxes above it are anchors (detector)
        window: int = 1               # tracking radius r: a (2r+1)^2 neighbourhood
        fusion: str = "mean"          # head fusion: mean (paper) | rms (authors' code)
        rollout_blocks: str = "all"   # all (paper) | global (authors' code)
        background: int = 0           # of the k tokens, evenly sampled from the rest

        def __post_init__(self) -> None:
            problems = []
            if not isinstance(self.k, int) or self.k < 1:
                problems.append(f"k must be a positive number of tokens, got {self.k!r}")
            elif not 0 <= self.background <= self.k:
                problems.append(f"background must be between 0 and k={self.k}, "
                                f"got {self.background!r}")
            if self.refresh < 0:
                problems.append(f"refresh must be >= 0 frames, got {self.refresh!r}")
            if self.window < 0:
                problems.append(f"window must be >= 0, got {self.window!r}")
            if not 0 <= self.score_threshold < 1:
                problems.append(f"score_threshold must be in [0, 1), got {self.score_threshold!r}")
            if self.fusion not in FUSIONS:
                problems.append(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
            if self.rollout_blocks not in ROLLOUT_BLOCKS:
                problems.append(f"rollout_blocks must be one of {', '.join(ROLLOUT_BLOCKS)}, "
                                f"got {self.rollout_blocks!r}")
            if problems:
                raise MethodError("rollout: " + "; ".join(problems))

    def check(self, model: torch.nn.Module, input_size: int | None = None) -> None:
        super().check(model, input_size)
        backbone = model.backbone
        size = input_size or getattr(model, "input_size", None)
        if size:  # a square input: the grid the budget is taken from
            n = (size // backbone.patch) ** 2
            if self.params.k > n:
                raise MethodError(f"rollout: k={self.params.k} exceeds the {n} tokens of a "
                                  f"{size // backbone.patch}x{size // backbone.patch} grid "
                                  f"(input size {size})")
        if model.task == "recognition":
            if not backbone.prefix:
                raise MethodError("rollout's recognizer variant reads the class token; "
                                  f"{type(model).__name__}'s backbone has none")
            if any(b.window or b.attn.use_rel_pos for b in backbone.blocks):
                raise MethodError("rollout's recognizer variant needs global attention without "
                                  "relative position (ViViT's spatial model)")
        elif model.task != "detection":
            raise MethodError(f"rollout runs on detectors and ViViT recognizers, not on "
                              f"{model.task} models")

    def new_state(self, backbone: ViT, batch: int) -> RolloutState:
        state = RolloutState()
        state.clear(backbone.depth)
        return state

    def observe(self, state: RolloutState, detections: list[Detections],
                ctx: StepContext) -> None:
        if state.grid is not None:  # nothing to prepare when the next frame is dense
            state.anchors = paint_anchors(detections, state.grid, ctx.input_size,
                                          self.params.score_threshold, ctx.valid)

    # -- one frame ------------------------------------------------------------------------------
    def forward(self, backbone: ViT, emb: Embedded, state: RolloutState, ledger: Ledger,
                ctx: StepContext) -> torch.Tensor:
        p = self.params
        n = emb.tokens.shape[1] - emb.prefix
        if p.k > n:
            raise MethodError(f"rollout: k={p.k} exceeds the {n} tokens of a "
                              f"{'x'.join(map(str, emb.grid))} grid")
        if _starts(ctx.first):
            state.frame = 0
        t = state.frame
        dense = t == 0 or (p.refresh > 0 and t % p.refresh == 0)
        record = not (p.refresh == 1 or (p.refresh > 0 and (t + 1) % p.refresh == 0))
        keep = None if dense else self._choose(backbone, emb, state, ledger, ctx)
        if dense and not record:  # nothing to carry: exactly the dense model
            tokens, _ = backbone.forward_blocks(emb.tokens, emb.grid, ledger)
        else:
            tokens = self._run(backbone, emb, keep, state, ledger, record)
        if record:
            state.grid, state.patches = emb.grid, emb.patches
            state.valid = ctx.valid if ctx.valid is not None else \
                torch.ones(emb.patches.shape[:2], dtype=torch.bool, device=emb.patches.device)
        else:
            state.clear(backbone.depth)
        state.frame = t + 1
        return tokens

    def _rollout_layers(self, backbone: ViT) -> list[int]:
        everything = self.params.rollout_blocks == "all"
        return [i for i, b in enumerate(backbone.blocks) if everything or not b.window]

    def _choose(self, backbone: ViT, emb: Embedded, state: RolloutState, ledger: Ledger,
                ctx: StepContext) -> torch.Tensor:
        """Tokens to keep this frame (B, K): rollout of the last frame, tracking, top-K."""
        prefix, n = emb.prefix, emb.patches.shape[1]
        b = emb.tokens.shape[0]
        if state.patches is None:
            raise RuntimeError("rollout: a pruned frame without the previous frame's record")
        if prefix:  # recognizer: the class token's row of the rollout
            last = state.keep.shape[1] if state.keep is not None else prefix + n
            s_last = emb.tokens.new_zeros(b, last, dtype=torch.float32)
            s_last[:, 0] = 1.0
        else:
            anchors = state.anchors if state.anchors is not None else state.valid
            a = anchors.float()
            s_last = a / a.sum(1, keepdim=True)
            ledger.add(2 * n, "overhead")  # the count and the division
        windows = [blk.window for blk in backbone.blocks]
        s0 = rollout(s_last, state.attn, state.attn_norms, windows, emb.grid, prefix + n,
                     state.keep, ledger)[:, prefix:]
        z = track(s0, state.patches, state.valid, emb.patches, emb.grid, self.params.window,
                  ledger)
        return top_k(z, ctx.valid, self.params.k, self.params.background)

    def _run(self, backbone: ViT, emb: Embedded, keep: torch.Tensor | None,
             state: RolloutState, ledger: Ledger, record: bool) -> torch.Tensor:
        """The blocks with pruning after block 0's attention (``keep`` None: every token).
        ``record``: keep what the next (pruned) frame needs."""
        x, grid, prefix = emb.tokens, emb.grid, emb.prefix
        b, n_all, d = x.shape
        drop = prefix > 0
        layers = set(self._rollout_layers(backbone)) if record else set()
        index = None
        if keep is not None:
            index = keep + prefix
            if prefix:
                lead = torch.arange(prefix, device=keep.device).expand(b, prefix)
                index = torch.cat([lead, index], dim=1)

        blk = backbone.blocks[0]
        qkv = blk.attn.qkv(blk.norm1(x))
        att = blk.attn.attend(qkv, grid, blk.window, prefix, ledger, need_probs=0 in layers,
                              probs_transient=True)  # fused by _record before the next block
        x = x + blk.attn.proj(att.out)
        ledger.linear(blk.attn.qkv, n_all)
        ledger.linear(blk.attn.proj, n_all)
        ledger.adds(n_all * d)
        if 0 in layers:
            self._record(state, 0, att.probs, None, b, blk.window, ledger)
        xk = x if index is None else _rows(x, index)
        m = xk.shape[1]
        xk = xk + blk.mlp(blk.norm2(xk), ledger)
        ledger.adds(m * d)
        ledger.processed(m)

        for layer in range(1, len(backbone.blocks)):
            blk = backbone.blocks[layer]
            need = layer in layers
            if drop:  # recognizer: pruned tokens are gone, blocks see the kept ones only
                xk, probs = blk(xk, grid, prefix, ledger, need)
                if need:
                    self._record(state, layer, probs, None, b, 0, ledger)
                continue
            qkv = blk.attn.qkv(blk.norm1(xk))
            if blk.window:
                cache = qkv if index is None else state.cache[layer].scatter_(
                    1, _expand(index, qkv.shape[-1]), qkv)
                att = blk.attn.attend(cache, grid, blk.window, prefix, ledger, need,
                                      probs_transient=True)
                out, probs = (att.out if index is None else _rows(att.out, index)), att.probs
                row_index = None
            else:
                kv = qkv[..., d:]
                cache = kv.contiguous() if index is None else state.cache[layer].scatter_(
                    1, _expand(index, kv.shape[-1]), kv)
                out, probs = _kept_attention(blk.attn, qkv[..., :d], cache, index, grid, prefix,
                                             ledger, need)
                row_index = index
            state.cache[layer] = cache
            xk = xk + blk.attn.proj(out)
            xk += blk.mlp(blk.norm2(xk), ledger)  # into the sum just made (inference only)
            ledger.linear(blk.attn.qkv, m)
            ledger.linear(blk.attn.proj, m)
            ledger.adds(2 * m * d)
            ledger.processed(m)
            if need:
                self._record(state, layer, probs, row_index, b, blk.window, ledger)

        if drop:
            state.keep = index
            # a dense map for the contract: pruned tokens as they were when dropped
            return xk if index is None else x.scatter(1, _expand(index, d), xk)
        out = xk if index is None else state.output.scatter(1, _expand(index, d), xk)
        state.output = out
        return out.clone()  # never hand out the buffer itself

    def _record(self, state: RolloutState, layer: int, probs: torch.Tensor,
                rows: torch.Tensor | None, batch: int, window: int, ledger: Ledger) -> None:
        """Fuse this block's attention for the next frame's rollout; ``rows`` (B, m): the
        token rows the probabilities belong to (others keep their latest rows)."""
        fused = fuse_heads(probs, self.params.fusion, ledger, batch)
        norms = row_norms(fused, ledger, batch)
        if window:
            fused = fused.view(batch, -1, *fused.shape[-2:])
            norms = norms.view(batch, -1, norms.shape[-1])
        if rows is None:
            state.attn[layer], state.attn_norms[layer] = fused, norms
        else:
            state.attn[layer].scatter_(1, _expand(rows, fused.shape[-1]), fused)
            state.attn_norms[layer].scatter_(1, rows, norms)


def _kept_attention(attn: Attention, q: torch.Tensor, kv: torch.Tensor,
                    index: torch.Tensor | None, grid: Grid, prefix: int, ledger: Ledger,
                    need_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries ``q`` (B, m, D) of tokens ``index`` (None: every token, in order) against the
    keys and values ``kv`` (B, P+N, 2D) of every token. Returns merged heads and the
    probabilities (B, heads, m, P+N) when asked."""
    d = q.shape[-1]
    qh, k, v = attn.split_heads(q), attn.split_heads(kv[..., :d]), attn.split_heads(kv[..., d:])
    rel = attn.use_rel_pos and not prefix
    if index is None:
        out, probs = attn.core(qh, k, v, grid if rel else None, grid if rel else None, ledger,
                               need_probs=need_probs, probs_transient=True)
        return attn.merge_heads(out), probs
    terms = None
    if rel:
        terms = rel_pos_terms_at(qh, index, grid, grid, attn.rel_pos_h, attn.rel_pos_w, ledger)
        ledger.adds(qh.shape[1] * qh.shape[2] * k.shape[2] * 2)  # both terms, every logit
    out, probs = attn.core(qh, k, v, None, grid if rel else None, ledger,
                           need_probs=need_probs, rel_terms=terms, probs_transient=True)
    return attn.merge_heads(out), probs


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, _expand(index, x.shape[-1]))


def _expand(index: torch.Tensor, width: int) -> torch.Tensor:
    return index[..., None].expand(*index.shape, width)


def _starts(first: Any) -> bool:
    """Whether the streams start now (``first`` is a bool or a (B,) tensor; lockstep)."""
    if isinstance(first, torch.Tensor):
        if first.numel() and bool(first.any()) != bool(first.all()):
            raise ValueError("rollout: the streams of one state must start together")
        return bool(first.any()) if first.numel() else False
    return bool(first)
