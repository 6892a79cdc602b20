"""SViT: learned per-token gates with re-activation (SViT, WACV 2024; docs/ARCHITECTURE.md).

Every block after the first few (``dense_blocks``; the authors keep 3 of 12 dense) has a gate,
``LayerNorm -> Linear(D, D/4) -> GELU -> Linear(D/4, 2) -> log-softmax``, that looks at the
full token map and keeps a token iff its keep logit (channel 0) wins. Only the kept tokens go
through the block; the others keep their stale features in the map, where the next gate sees
them and may re-activate them. The map that leaves the backbone is dense, so detection heads
and mean-pooling recognizers take it as is. Prefix tokens (a class token) are always kept.

Where the gates live. They are trained weights of a particular model, so they belong to the
model, not to the method: ``attach_gates`` hangs an :class:`SViTGates` module on the backbone
(``backbone.svit_gates``; state-dict keys ``backbone.svit_gates.gates.<i>.*``), and the
registry builds it when the architecture options carry ``"svit": {"dense_blocks": ...,
"keep_ratios": [...]}``. A zoo entry ``<model>-svit`` is then an ordinary zoo card whose
``options`` include that spec, beside a safetensors file holding the model's weights and the
gates (``vidprune train-gates`` writes both); ``pruning.method: svit`` runs it, and refuses a
model without gates.

Inference with ragged kept sets. One stream: gather the kept tokens, run the block, scatter
them back. Several streams keep different numbers of tokens; we pad every stream's kept set to
the largest one of the batch (left-aligned, kept tokens in their original order) and mask the
padding out as keys. We chose padding with masks over nested tensors because the attention here
needs an additive bias (decomposed relative position in ViTDet's global blocks) and
``Attention.core``'s key mask, which PyTorch's nested-tensor attention does not take, and
nested tensors are still a prototype (the SViT authors say the same, and ran dense tasks at
batch size 1). The ledger counts, per stream, the work on that stream's kept tokens as
``backbone``, the gates as ``overhead`` and the work spent on padding rows as ``padding``; its
token count is the number of tokens each block really processed. This is also the answer to
"how do I count FLOPs with dynamic token counts": per stream, per block, from what ran.

Windowed blocks (ViTDet). The authors prune ViT-Adapter, whose ViT has global attention only
(their code drops the window option when pruning), so they never faced windows. We run the
token-wise parts (qkv, projection, MLP: ~95% of a windowed block) on the kept tokens only, put
their qkv back in the grid, and run the windowed attention on the window grid with pruned
tokens masked as keys, exactly the rule used in training (window padding stays a key, as in the
dense model). Attention rows of pruned tokens are computed and discarded: they run for the
stream itself, at one stream too, so the ledger counts them as ``backbone`` (as rollout counts
the dense windowed attention it runs). Packing kept tokens per window would save that ~5% at
the price of per-window gathers and coordinate-based relative position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Block, Grid, rel_pos_terms_at
from ..ledger import Ledger
from ..vit import Embedded, ViT
from . import register
from .base import Method, MethodError, MethodState, StepContext

#: The authors' keep targets fall geometrically in three groups of gated blocks.
BASE_KEEP = 0.7


def default_dense_blocks(depth: int) -> int:
    """Blocks left dense in front: the authors' 3 of 12, scaled to the depth."""
    return depth // 4


def default_keep_ratios(gated: int, base: float = BASE_KEEP) -> list[float]:
    """Targets for ``gated`` blocks in three near-equal contiguous groups: base, base^2,
    base^3 (0.7, 0.49, 0.343: the authors' 3 x 3 for DeiT-S and ViT-Adapter-S)."""
    groups = min(3, gated)
    out = []
    for g in range(groups):
        size = gated // groups + (1 if g < gated % groups else 0)
        out += [round(base ** (g + 1), 6)] * size
    return out


class TokenGate(nn.Module):
    """One block's gate: log-probabilities (keep, prune) per token."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim // 4)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim // 4, 2)
        for fc in (self.fc1, self.fc2):  # timm's ViT initialisation, as the authors'
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(self.act(self.fc1(self.norm(x)))), dim=-1)

    def decide(self, x: torch.Tensor, ledger: Ledger | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep decisions (B, n) bool, True where the keep logit wins (a tie prunes, as the
        authors'), and the keep probabilities (B, n) they come from."""
        logp = self(x)
        if ledger is not None:
            ledger.linear(self.fc1, x.shape[1], "overhead")
            ledger.linear(self.fc2, x.shape[1], "overhead")
        return logp[..., 0] > logp[..., 1], logp[..., 0].exp()


class SViTGates(nn.Module):
    """The gates of one backbone: one per block from ``dense_blocks`` on, with its target."""

    def __init__(self, dim: int, depth: int, dense_blocks: int | None = None,
                 keep_ratios: Sequence[float] | None = None):
        super().__init__()
        self.dense_blocks = default_dense_blocks(depth) if dense_blocks is None \
            else int(dense_blocks)
        if not 0 <= self.dense_blocks < depth:
            raise ValueError(f"svit: dense_blocks must be in [0, {depth - 1}] for {depth} "
                             f"blocks, got {self.dense_blocks}")
        gated = depth - self.dense_blocks
        ratios = default_keep_ratios(gated) if keep_ratios is None else \
            [float(k) for k in keep_ratios]
        if len(ratios) != gated or not all(0.0 < k <= 1.0 for k in ratios):
            raise ValueError(f"svit: keep_ratios needs {gated} values in (0, 1] (one per gated "
                             f"block), got {list(keep_ratios or [])}")
        self.keep_ratios = ratios
        self.gates = nn.ModuleList(TokenGate(dim) for _ in range(gated))

    def gate(self, block: int) -> TokenGate | None:
        return self.gates[block - self.dense_blocks] if block >= self.dense_blocks else None

    def spec(self) -> dict[str, Any]:
        """What the registry needs to rebuild these gates (goes into the zoo card options)."""
        return {"dense_blocks": self.dense_blocks, "keep_ratios": list(self.keep_ratios)}


def attach_gates(model: nn.Module, spec: dict[str, Any] | None = None) -> SViTGates:
    """Give ``model``'s backbone SViT gates built from ``spec`` (defaults when empty) and
    record the spec in the model's build options, so checkpoints and zoo cards carry it."""
    backbone = model.backbone
    gates = SViTGates(backbone.dim, backbone.depth, **(spec or {}))
    param = next(backbone.parameters(), None)
    if param is not None:
        gates.to(device=param.device, dtype=param.dtype)
    backbone.svit_gates = gates
    if hasattr(model, "build_options"):
        model.build_options = {**model.build_options, "svit": gates.spec()}
    return gates


def gates_of(backbone: ViT) -> SViTGates | None:
    return getattr(backbone, "svit_gates", None)


# --- inference on kept tokens ----------------------------------------------------------------

def pack_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept positions of each stream, left-aligned and padded to the largest kept set.

    ``keep`` (B, n) bool -> positions (B, K) long (kept ones first, in token order), ``valid``
    (B, K) bool (False on padding), counts (B,).
    """
    counts = keep.sum(dim=1)
    k = int(counts.max())
    positions = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=keep.device)[None, :] < counts[:, None]
    return positions, valid, counts


def rel_pos_bias_at(attn: nn.Module, q: torch.Tensor, positions: torch.Tensor, grid: Grid
                    ) -> torch.Tensor:
    """Decomposed relative position (ViTDet) between gathered tokens of a 2-D grid.

    ``q`` (B, h, K, c) unscaled queries of the tokens at ``positions`` (B, K); the same tokens
    are the keys. Returns the (B, h, K, K) bias, the same numbers the dense grid computation
    gives for these query/key pairs.
    """
    # the terms of the gathered queries against the full grid (counted by the caller, which
    # knows each stream's real token count), then read at the gathered keys
    rel_h, rel_w = rel_pos_terms_at(q, positions, grid, grid, attn.rel_pos_h, attn.rel_pos_w)
    rows, cols = positions // grid[1], positions % grid[1]
    # per stream, so no (B, h, K, K) index tensor is ever built
    return torch.stack([rel_h[i][..., rows[i]] + rel_w[i][..., cols[i]]
                        for i in range(q.shape[0])])


def sparse_block(blk: Block, x: torch.Tensor, keep: torch.Tensor, grid: Grid, prefix: int,
                 ledger: Ledger | None = None) -> torch.Tensor:
    """Run ``blk`` on the kept tokens of each stream only; the others keep their features.

    ``x`` (B, P+N, D), ``keep`` (B, N) bool for the grid tokens (prefix tokens are always
    kept). Returns the updated full map.
    """
    b, n_all, d = x.shape
    if prefix:
        keep = torch.cat([keep.new_ones(b, prefix), keep], dim=1)
    positions, valid, counts = pack_kept(keep)
    k = positions.shape[1]
    if k == 0:  # every stream pruned every token
        return x
    xs = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, d))
    qkv = blk.attn.qkv(blk.norm1(xs))
    if blk.window:
        out = _windowed_attention(blk, qkv, positions, valid, keep, grid, ledger)
    else:
        out = _packed_attention(blk, qkv, positions, valid, grid, prefix, ledger)
    xs = xs + blk.attn.proj(out)
    xs = xs + blk.mlp(blk.norm2(xs), ledger, tokens=counts)
    if ledger is not None:
        pad = k - counts
        for layer in (blk.attn.qkv, blk.attn.proj):
            ledger.linear(layer, counts)
            ledger.linear(layer, pad, "padding")
        ledger.linear(blk.mlp.fc1, pad, "padding")
        ledger.linear(blk.mlp.fc2, pad, "padding")
        ledger.adds(2 * counts * d)  # the two residual additions
        ledger.adds(2 * pad * d, "padding")
        ledger.processed(counts)
    rows = torch.arange(b, device=x.device)[:, None].expand(b, k)
    return x.index_put((rows[valid], positions[valid]), xs[valid])


def _packed_attention(blk: Block, qkv: torch.Tensor, positions: torch.Tensor,
                      valid: torch.Tensor, grid: Grid, prefix: int, ledger: Ledger | None
                      ) -> torch.Tensor:
    """Global attention among each stream's kept tokens (padding masked out as keys)."""
    attn = blk.attn
    q, k, v = (attn.split_heads(t) for t in qkv.chunk(3, dim=-1))
    h, kk, c = q.shape[1], q.shape[2], q.shape[3]
    bias = None
    rel = attn.use_rel_pos and not prefix  # as the dense path: no relative position with prefix
    if rel:
        bias = rel_pos_bias_at(attn, q, positions, grid)
    out, _ = attn.core(q, k, v, None, None, key_mask=valid, attn_bias=bias)
    if ledger is not None:
        counts = valid.sum(dim=1).double()
        pairs = counts * counts
        pad_pairs = kk * kk - pairs
        ledger.matmul(2 * h * pairs, c)  # q k^T and attn v
        ledger.matmul(2 * h * pad_pairs, c, "padding")
        if rel:
            ledger.matmul(h * counts * sum(grid), c)  # the two relative-position einsums
            ledger.matmul(h * (kk - counts) * sum(grid), c, "padding")
            ledger.adds(2 * h * pairs)  # both terms added to every logit
            ledger.adds(2 * h * pad_pairs, "padding")
    return attn.merge_heads(out)


def _windowed_attention(blk: Block, qkv: torch.Tensor, positions: torch.Tensor,
                        valid: torch.Tensor, keep: torch.Tensor, grid: Grid,
                        ledger: Ledger | None) -> torch.Tensor:
    """Windowed attention on the grid with pruned tokens masked as keys (module docstring)."""
    attn = blk.attn
    b, n = keep.shape
    pad_value = attn.qkv_pad_value()
    full = qkv.new_zeros(b, n, qkv.shape[-1])
    if pad_value is not None:  # pruned tokens: what a zero input would give (never a key)
        full[:] = pad_value.to(full.dtype)
    rows = torch.arange(b, device=qkv.device)[:, None].expand_as(positions)
    full = full.index_put((rows[valid], positions[valid]), qkv[valid])
    out = attn.attend(full, grid, blk.window, key_mask=keep).out
    if ledger is not None:
        w = blk.window
        gh, gw = grid
        n_windows = -(-gh // w) * -(-gw // w)
        c, h = attn.head_dim, attn.num_heads
        per_query = 2 * h * w * w * c  # q k^T and attn v over one window
        if attn.use_rel_pos:
            per_query += h * 2 * w * c + 2 * h * w * w
        # every query of every window runs, pruned and window padding ones included (the
        # dense model runs the window padding too): the stream's own work, not padding
        ledger.add(n_windows * w * w * per_query)
    return out.gather(1, positions.unsqueeze(-1).expand(-1, -1, out.shape[-1]))


@dataclass
class SViTState(MethodState):
    """Carries nothing between frames; keeps what the gates did at the last step, per stream
    and gated block (B, gated): the fraction of tokens kept, and the mean keep probability
    (what the training's keep-ratio loss controls)."""

    keep_fraction: torch.Tensor | None = None
    keep_probability: torch.Tensor | None = None


@register
class SViT(Method):
    """Learned gates with re-activation (see the module docstring). The gates are part of
    the model (``backbone.svit_gates``); the method has no parameters of its own."""

    name = "svit"
    kinds = frozenset({"frame", "clip"})

    @dataclass
    class Params:
        pass

    def check(self, model: nn.Module, input_size: int | None = None) -> None:
        super().check(model, input_size)
        if gates_of(model.backbone) is None:
            raise MethodError(
                "svit needs a model with trained gates (a zoo entry '<model>-svit', or "
                "architecture options with 'svit'); train them with `vidprune train-gates`")

    def new_state(self, backbone: ViT, batch: int) -> SViTState:
        return SViTState()

    def forward(self, backbone: ViT, emb: Embedded, state: MethodState, ledger: Ledger,
                ctx: StepContext) -> torch.Tensor:
        gates = gates_of(backbone)
        x, p = emb.tokens, emb.prefix
        fractions, probabilities = [], []
        for i, blk in enumerate(backbone.blocks):
            gate = gates.gate(i)
            if gate is None:
                x, _ = blk(x, emb.grid, p, ledger)
                continue
            keep, prob = gate.decide(x[:, p:], ledger)
            fractions.append(keep.float().mean(dim=1))
            probabilities.append(prob.float().mean(dim=1))
            x = sparse_block(blk, x, keep, emb.grid, p, ledger)
        if isinstance(state, SViTState):
            state.keep_fraction = torch.stack(fractions, dim=1)
            state.keep_probability = torch.stack(probabilities, dim=1)
        return x
