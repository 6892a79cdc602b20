"""STA: semantic-aware temporal accumulation (Ding et al., ICCV 2023; docs/ARCHITECTURE.md).

A training-free *clip* method for joint space-time ViTs (the VideoMAE layout: ``T`` slices of
``N`` tokens, no class token, mean pooling). Three pruning stages run at the end of blocks
``0, L//3, 2L//3`` (the paper's 1st, (1+L/3)th, (1+2L/3)th block). A stage cuts the token
sequence into temporal groups (``T``, ``T/2``, ``T/4`` groups: from stage 2 on, a group is two
adjacent groups of the previous stage, concatenated, treated as one "frame") and visits the
groups forward, backward, forward. In every group it removes ``r`` tokens: the first group
visited by a bipartite (ToMe-style) drop, every later group by the semantic-aware accumulated
score. Since the number of groups halves while ``r`` per group stays, the tokens removed per
input slice are ``r, r/2, r/4``: the paper's decreasing schedule ``{8r, 8r/2, 8r/4}`` in total
(STA^64-ViT-L: ``{8x64, 8x32, 8x16}``), and its 180 -> 116 GFLOPs for ViT-B at r = 48.

Every group keeps the same number of tokens, so shapes are static and clips batch freely.

The similarity metric is the block's own keys (computed by the block, reused here), averaged
over heads and L2-normalised; the semantic score is ``||x||_1`` of the block output, min-max
normalised within the group. Work done here (head mean, norms, similarity products,
accumulation) is counted in the ledger's ``overhead`` category.

Where the authors' code differs from the paper (``first_transition``): the paper transports
the accumulated score from the *kept* tokens of the previous slice, starting from ones on the
tokens the first slice kept (default, ``"kept"``); the authors' code builds the first
transition from all tokens of the first slice, the dropped ones included (``"all"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ledger import Ledger
from ..vit import Embedded, ViT
from . import register
from .base import Method, MethodError, MethodState, StepContext

#: Visiting order of the groups in the three stages: forward, backward, forward (paper 6b).
STAGE_REVERSED = (False, True, False)


def stage_blocks(depth: int) -> tuple[int, int, int]:
    """Indices (0-based) of the blocks after which the three stages run."""
    return 0, depth // 3, 2 * depth // 3


def stage_groups(slices: int) -> tuple[int, int, int]:
    """Temporal groups per stage: every slice, then pairs, then quadruples."""
    return slices, slices // 2, slices // 4


def group_sizes(tokens_per_slice: int, slices: int, r: int) -> list[tuple[int, int]]:
    """(groups, tokens per group) entering each stage, for ``r`` tokens removed per group."""
    out = []
    per_group = tokens_per_slice
    for stage, groups in enumerate(stage_groups(slices)):
        if stage:  # a group is two groups of the previous stage, each r tokens lighter
            per_group = 2 * (per_group - r)
        out.append((groups, per_group))
    return out


def head_mean_keys(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The keys inside a block's qkv projection (B, n, 3D), averaged over heads: (B, n, D/h)."""
    b, n, three_d = qkv.shape
    d = three_d // 3
    return qkv[..., d:2 * d].reshape(b, n, heads, d // heads).mean(dim=2)


def semantic_score(x: torch.Tensor) -> torch.Tensor:
    """``||x||_1`` over channels, min-max normalised over the tokens of each group.

    ``x`` (B, G, n, D) -> (B, G, n) in [0, 1].
    """
    s = x.abs().sum(-1)
    lo = s.min(dim=-1, keepdim=True).values
    hi = s.max(dim=-1, keepdim=True).values
    # a constant group (never seen on real features) would divide by zero
    return (s - lo) / (hi - lo).clamp_min(torch.finfo(s.dtype).tiny)


def bipartite_drop(metric: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the ``n - r`` tokens kept by ToMe-style bipartite dropping.

    ``metric`` (B, n, c), L2-normalised. Tokens are split alternately into a first set
    (even positions) and a second set (odd positions); the ``r`` tokens of the first set most
    similar to any token of the second set are dropped. Kept tokens come in the order the
    authors' code leaves them (all of the second set, then the first set from least to most
    similar), which matters because the next stage splits its first group alternately again.
    """
    b, n, _ = metric.shape
    first = torch.arange(0, n, 2, device=metric.device)
    second = torch.arange(1, n, 2, device=metric.device)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)
    best = scores.max(dim=-1).values
    order = best.argsort(dim=-1, stable=True)  # least similar first
    ranked_first = first[order]
    kept = torch.cat([second.expand(b, -1), ranked_first], dim=1)
    return kept[:, : n - r]


def accumulate(metric: torch.Tensor, prev_metric: torch.Tensor, s_acc: torch.Tensor,
               semantic: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One accumulation step of STA (Algorithm 1) for a later group of a stage.

    ``metric`` (B, n, c) of the current group, ``prev_metric`` (B, m, c) of the tokens kept
    in the previous group, ``s_acc`` (B, m) their accumulated score, ``semantic`` (B, n).
    The transition ``softmax(metric prev_metric^T)`` is normalised over the current tokens
    (each previous token hands its score on), ``s = M s_acc``; the ``n - r`` tokens with the
    smallest ``s * (1 - semantic)`` are kept. Returns their indices (ascending score) and
    their accumulated score, renormalised to sum 1.
    """
    n = metric.shape[1]
    transition = (metric @ prev_metric.transpose(-1, -2)).softmax(dim=1)
    s = (transition @ s_acc.unsqueeze(-1)).squeeze(-1)
    score = s * (1 - semantic)
    kept = score.topk(n - r, dim=1, largest=False).indices
    s_kept = s.gather(1, kept)
    return kept, s_kept / s_kept.sum(dim=1, keepdim=True)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def prune_stage(x: torch.Tensor, keys: torch.Tensor, groups: int, reverse: bool, r: int,
                first_transition: str = "kept", ledger: Ledger | None = None) -> torch.Tensor:
    """One STA stage: ``x`` (B, G*n, D) tokens after a block, ``keys`` (B, G*n, c) that
    block's head-averaged keys. Returns (B, G*(n - r), D), groups in temporal order."""
    b, total, d = x.shape
    n = total // groups
    c = keys.shape[-1]
    xg = x.view(b, groups, n, d)
    metric = keys / keys.norm(dim=-1, keepdim=True)
    metric = metric.view(b, groups, n, c)
    semantic = semantic_score(xg)
    order = list(range(groups))[::-1] if reverse else list(range(groups))

    first = order[0]
    kept = bipartite_drop(metric[:, first], r)
    out = {first: _gather(xg[:, first], kept)}
    if first_transition == "kept":
        prev_metric = _gather(metric[:, first], kept)
    else:  # the authors' code: the first transition starts from every token of the first group
        prev_metric = metric[:, first]
    s_acc = prev_metric.new_ones(b, prev_metric.shape[1])
    if ledger is not None:
        ledger.adds(total * c, "overhead")   # squared norms of the keys
        ledger.adds(total * d, "overhead")   # the semantic score's L1 sums
        ledger.matmul((n - n // 2) * (n // 2), c, "overhead")  # bipartite similarities
    for g in order[1:]:
        m_prev = prev_metric.shape[1]
        kept, s_acc = accumulate(metric[:, g], prev_metric, s_acc, semantic[:, g], r)
        out[g] = _gather(xg[:, g], kept)
        prev_metric = _gather(metric[:, g], kept)
        if ledger is not None:
            ledger.matmul(n * m_prev, c, "overhead")  # similarity to the previous kept tokens
            ledger.matmul(n, m_prev, "overhead")      # s = M s_acc
            ledger.adds(n, "overhead")                # score = s * (1 - semantic)
    return torch.cat([out[g] for g in range(groups)], dim=1)


@register
class STA(Method):
    """Semantic-aware temporal accumulation on a clip backbone (see the module docstring)."""

    name = "sta"
    kinds = frozenset({"clip"})

    @dataclass
    class Params:
        r: int = 48                      # tokens removed per temporal group at each stage
        first_transition: str = "kept"   # "kept": the paper; "all": the authors' code

        def __post_init__(self) -> None:
            if not isinstance(self.r, int) or self.r < 0:
                raise MethodError(f"sta: r must be a non-negative integer, got {self.r!r}")
            if self.first_transition not in ("kept", "all"):
                raise MethodError(f"sta: first_transition must be 'kept' (paper) or 'all' "
                                  f"(authors' code), got {self.first_transition!r}")

    def check(self, model: torch.nn.Module, input_size: int | None = None) -> None:
        super().check(model, input_size)
        backbone = model.backbone
        if backbone.prefix or any(backbone.windows) or not backbone.tubelet \
                or backbone.blocks[0].attn.use_rel_pos:
            raise MethodError("sta runs on joint space-time ViTs with global attention, no class "
                              "token and no relative position (the VideoMAE layout)")
        if backbone.depth < 3:
            raise MethodError(f"sta needs at least 3 blocks, the model has {backbone.depth}")
        slices = model.clip_frames // backbone.tubelet
        grid = (input_size or getattr(model, "input_size", 224)) // backbone.patch
        self._check_sizes(slices, grid * grid)

    def _check_sizes(self, slices: int, tokens_per_slice: int) -> None:
        if slices < 4 or slices % 4:
            raise MethodError(f"sta groups slices in pairs and quadruples: the clip must have a "
                              f"multiple of 4 temporal slices, it has {slices}")
        r = self.params.r
        for groups, per_group in group_sizes(tokens_per_slice, slices, r):
            if r > per_group // 2:
                raise MethodError(f"sta: r = {r} is too large for groups of {per_group} tokens "
                                  f"(at most {per_group // 2})")

    def forward(self, backbone: ViT, emb: Embedded, state: MethodState, ledger: Ledger,
                ctx: StepContext) -> torch.Tensor:
        r = self.params.r
        if r == 0:  # the paper's r = 0 column: the dense model
            tokens, _ = backbone.forward_blocks(emb.tokens, emb.grid, ledger)
            return tokens
        slices, h, w = emb.grid
        self._check_sizes(slices, h * w)
        stages = {blk: (groups, rev) for blk, groups, rev in
                  zip(stage_blocks(backbone.depth), stage_groups(slices), STAGE_REVERSED)}
        x, grid = emb.tokens, emb.grid
        for i, blk in enumerate(backbone.blocks):
            if i not in stages:
                x, _ = blk(x, grid, 0, ledger)
                continue
            x, qkv, _ = blk.forward_qkv(x, grid, 0, ledger)
            keys = head_mean_keys(qkv, blk.attn.num_heads)
            if ledger is not None:
                ledger.adds(x.shape[1] * qkv.shape[-1] // 3, "overhead")  # mean over heads
            groups, rev = stages[i]
            x = prune_stage(x, keys, groups, rev, r, self.params.first_transition, ledger)
            # pruned tokens no longer form a grid; global attention without relative
            # position (checked) only needs their number
            grid = (x.shape[1],)
        return x
