"""Eventful Transformers (Dutson, Li, Gupta, ICCV 2023; docs/ARCHITECTURE.md, Methods).

Every block gets three gate/buffer pairs -- before the qkv projection, before the output
projection and before the MLP, gates after the LayerNorms -- so the token-wise ops run only on
the tokens whose input changed most since they were last updated; the residual stream stays
dense. Global-attention blocks (ViTDet's global blocks, every block of a plain ViT) also update
attention sparsely: the rows and columns of the cached query-key product for the updated set S,
each with its relative-position terms (the cache holds the logits, see AttentionCache), softmax
recomputed densely, and the attention-value product
corrected with ``A_new[:, S] dv + dA v_ref[S]`` (changes of A outside the columns S are
ignored, as in the paper). Windowed blocks recompute their attention on the buffered qkv. A
stream's first frame runs densely and fills every buffer.

Prefix tokens (the ViViT spatial model's class token): by default they are gated like any other
token and count in ``r``, as the authors' ViViT does (the class token is concatenated before
the backbone and its gates see it). ``prefix="always"`` updates them on every frame instead,
within the same budget (``top_r`` then picks ``r - P`` grid tokens).

``sparse_attention=False`` is the paper's "Token-wise only" variant (attention dense on the
buffered qkv). ``av_half`` computes the attention-value products in half precision (bfloat16 on
CPU, float16 elsewhere), as the authors do in global blocks; the cached output stays in the
model's precision.

Counting (docs/ARCHITECTURE.md, counting convention): token-wise ops count their selected rows;
the sparse query-key update counts ``2 x heads x |S| x T x head_dim``, the attention-value
correction ``2 x heads x T x |S| x head_dim``; the relative-position einsums run for every
query (as in the dense model), their terms are added to the rows and columns S only; softmax
runs densely (not counted, as in the dense model). Overhead: gate errors and norms, the
subtractions and additions of the attention-value correction, and every element written into a
reference, buffer or attention cache on incremental frames.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..layers import Block, Grid, add_rel_pos, add_rel_pos_, rel_pos_terms, scratch, softmax_
from ..ledger import Ledger
from ..vit import Embedded, ViT
from . import MethodError, register
from .base import Method, MethodState, StepContext
from .gates import (Buffer, Gate, GateParams, Selection, count_linear, count_rows, give_back,
                    state_copy, state_empty)


#: Elements of the T x T product that :meth:`Eventful._softmax_columns` handles at a time
#: (2 MB of float32: one core's L2 cache on the machine it was tuned on).
ROW_BLOCK_ELEMENTS = 1 << 19


@dataclass
class AttentionCache:
    """Sparse global attention state: the attention logits ``logits`` (B, h, T, T), the
    scaled query-key product with relative position added, the attention matrix whose
    columns were last used, stored transposed as ``a_ref_t`` (B, h, T keys, T queries) so
    that reading and writing the columns of the updated tokens touches contiguous rows, and
    the attention-value output ``out`` (B, h, T, c).

    The logits are cached with relative position included because both terms of a logit
    depend only on its query and its key's position: the rows of the queries that did not
    change keep their terms, so only the rows and columns ``S`` that are rewritten need them
    again (the same numbers as adding them to the whole product every frame, where that
    dense addition cost more than the sparse products it follows)."""

    logits: torch.Tensor | None = None
    a_ref_t: torch.Tensor | None = None
    out: torch.Tensor | None = None

    def reset(self) -> None:
        self.logits = self.a_ref_t = self.out = None


@dataclass
class BlockState:
    qkv_gate: Gate
    proj_gate: Gate
    mlp_gate: Gate
    qkv: Buffer = field(default_factory=Buffer)
    proj: Buffer = field(default_factory=Buffer)
    mlp: Buffer = field(default_factory=Buffer)
    attention: AttentionCache | None = None

    def reset(self) -> None:
        for part in (self.qkv_gate, self.proj_gate, self.mlp_gate, self.qkv, self.proj,
                     self.mlp, self.attention):
            if part is not None:
                part.reset()


def _block_tensors(blocks: list[BlockState]) -> list[torch.Tensor]:
    """The tensors the blocks' state holds now: references, buffers, attention caches."""
    tensors = []
    for b in blocks:
        tensors += [b.qkv_gate.ref, b.proj_gate.ref, b.mlp_gate.ref, b.qkv.value,
                    b.proj.value, b.mlp.value]
        if b.attention is not None:
            tensors += [b.attention.logits, b.attention.a_ref_t, b.attention.out]
    return [t for t in tensors if t is not None]


def _give_back_blocks(blocks: list[BlockState]) -> None:
    give_back(_block_tensors(blocks))


@dataclass
class EventfulState(MethodState):
    """The state of a batch of streams. Its memory (1.6 GB per stream for ViTDet-B at 672)
    goes back to :func:`~.gates.state_empty` when the streams restart (:meth:`reset`) or
    the state ends, so that the next first frame reuses it instead of faulting in new
    pages (measured: that was most of the cost of a first frame beyond a dense one)."""

    blocks: list[BlockState]
    started: bool = False  # False until a first (dense) frame filled the state

    def __post_init__(self) -> None:
        finalizer = weakref.finalize(self, _give_back_blocks, self.blocks)
        finalizer.atexit = False

    def reset(self) -> None:
        _give_back_blocks(self.blocks)
        for b in self.blocks:
            b.reset()
        self.started = False

    def nbytes(self) -> int:
        """Memory the state holds now (all streams): references, buffers, attention caches."""
        return sum(t.numel() * t.element_size() for t in _block_tensors(self.blocks))


@register
class Eventful(Method):
    name = "eventful"
    kinds = frozenset({"frame"})

    @dataclass
    class Params(GateParams):
        sparse_attention: bool = True  # False: the paper's "Token-wise only" variant
        av_half: bool = False          # attention-value products in half precision

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.av_half and not self.sparse_attention:
                raise MethodError(
                    "av_half needs sparse_attention: the half-precision attention-value "
                    "products are those of the sparse attention update (the paper's global "
                    "self-attention operators); without it attention runs densely")

    gate_class: type[Gate] = Gate

    def sparse_attention(self) -> bool:
        """Whether global blocks update attention sparsely (variants without it override)."""
        return self.params.sparse_attention

    def _gate(self, prefix: int) -> Gate:
        p = self.params
        return self.gate_class(p.make_policy(), prefix if p.prefix == "always" else 0)

    # -- the method contract ------------------------------------------------------------------
    def new_state(self, backbone: ViT, batch: int) -> EventfulState:
        blocks = []
        for blk in backbone.blocks:
            sparse = self.sparse_attention() and blk.window == 0
            blocks.append(BlockState(self._gate(backbone.prefix), self._gate(backbone.prefix),
                                     self._gate(backbone.prefix),
                                     attention=AttentionCache() if sparse else None))
        return EventfulState(blocks)

    def forward(self, backbone: ViT, emb: Embedded, state: EventfulState, ledger: Ledger,
                ctx: StepContext) -> torch.Tensor:
        flush = bool(ctx.first) or not state.started  # streams of one state start together
        if flush:
            state.reset()
        x = emb.tokens
        for blk, bs in zip(backbone.blocks, state.blocks):
            if flush:
                x = self._dense_block(blk, bs, x, emb.grid, emb.prefix, ledger)
            else:
                x = self._gated_block(blk, bs, x, emb.grid, emb.prefix, ledger)
        state.started = True
        return x

    # -- blocks -------------------------------------------------------------------------------
    def _dense_block(self, blk: Block, bs: BlockState, x: torch.Tensor, grid: Grid,
                     prefix: int, ledger: Ledger) -> torch.Tensor:
        """A stream's first frame: every op dense, every reference and buffer filled."""
        t, d = x.shape[1], x.shape[2]
        c = blk.norm1(x)
        bs.qkv_gate.flush(c)
        qkv = blk.attn.qkv(c)
        ledger.linear(blk.attn.qkv, t)
        if bs.attention is not None:
            a = self._dense_attention(blk, bs.attention, qkv, grid, prefix, ledger)
        else:
            a = blk.attn.attend(qkv, grid, blk.window, prefix, ledger).out
        bs.qkv.fill(qkv)
        bs.proj_gate.flush(a)
        bs.proj.fill(blk.attn.proj(a))
        ledger.linear(blk.attn.proj, t)
        x = bs.proj.add_to(x)
        c = blk.norm2(x)
        bs.mlp_gate.flush(c)
        bs.mlp.fill(blk.mlp(c, ledger))
        x = bs.mlp.add_to(x, in_place=True)  # x is the sum made just above
        ledger.adds(2 * t * d)  # the two residual additions
        ledger.processed(t)
        return x

    def _gated_block(self, blk: Block, bs: BlockState, x: torch.Tensor, grid: Grid,
                     prefix: int, ledger: Ledger) -> torch.Tensor:
        t, d = x.shape[1], x.shape[2]
        sel, rows = bs.qkv_gate(blk.norm1(x), ledger)
        qkv_rows = blk.attn.qkv(rows)
        count_linear(ledger, blk.attn.qkv, sel)
        if bs.attention is not None:
            qkv_old = bs.qkv.rows(sel)
            if sel.mask is not None:  # padding rows keep their old qkv (they are not written)
                keep = sel.mask[..., None]
                qkv_rows = torch.where(keep, qkv_rows, qkv_old)
            bs.qkv.update(sel, qkv_rows, ledger)
            a = self._sparse_attention(blk, bs.attention, bs.qkv.peek(), qkv_rows, qkv_old, sel,
                                       grid, prefix, ledger)
        else:
            bs.qkv.update(sel, qkv_rows, ledger)
            a = blk.attn.attend(bs.qkv.peek(), grid, blk.window, prefix, ledger).out

        sel, rows = bs.proj_gate(a, ledger)
        bs.proj.update(sel, blk.attn.proj(rows), ledger)
        count_linear(ledger, blk.attn.proj, sel)
        x = bs.proj.add_to(x)

        sel, rows = bs.mlp_gate(blk.norm2(x), ledger)
        bs.mlp.update(sel, blk.mlp(rows), ledger)
        count_linear(ledger, blk.mlp.fc1, sel)
        count_linear(ledger, blk.mlp.fc2, sel)
        x = bs.mlp.add_to(x, in_place=True)  # x is the sum made just above
        ledger.adds(2 * t * d)
        ledger.processed(sel.count)
        return x

    # -- global attention ---------------------------------------------------------------------
    def _logits(self, cache: AttentionCache, transient: bool) -> torch.Tensor:
        """Softmax of the cached logits (relative position included) into a new tensor,
        never into the cache. ``transient``: the caller is done with the result before the
        next block (it then lives in a reused work buffer)."""
        logits = cache.logits
        out = scratch("eventful.attention", logits.shape, logits.dtype, logits.device) \
            if transient else torch.empty_like(logits)
        return softmax_(logits, out=out)

    def _rel_terms(self, blk: Block, q: torch.Tensor, grid: Grid, prefix: int,
                   ledger: Ledger) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both relative-position terms of every query (None where the block has none)."""
        attn = blk.attn
        if not (attn.use_rel_pos and not prefix):
            return None
        return rel_pos_terms(q, grid, grid, attn.rel_pos_h, attn.rel_pos_w, ledger,
                             per_stream=q.shape[1])

    def _softmax_columns(self, cache: AttentionCache, sel: Selection,
                         cols: torch.Tensor | None = None) -> torch.Tensor:
        """First ``cols`` (B, h, T, K), if given, written into the columns ``sel`` of the
        cached logits (padding columns keep theirs); then the columns ``sel`` (B, h, T, K) of
        the softmax of the logits (on the CPU at inference the transpose of a work buffer
        that the next call overwrites). On the CPU by blocks of rows, the columns written into
        each block just before its softmax reads it (a scatter over the whole T x T matrix
        touched nearly every cache line of it once more)."""
        logits = cache.logits
        if not _by_blocks(logits):
            if cols is not None:
                sel.write_columns(logits, cols)
            return sel.columns(self._logits(cache, transient=True))
        b, h, t, _ = logits.shape
        # written transposed, (B, h, K, T): the caller wants A_new[:, S] as rows of A_ref's
        # transpose too, and this read of the block's columns ran faster than a contiguous one
        out_t = scratch("eventful.softmax_columns", (b, h, sel.width, t), logits.dtype,
                        logits.device)
        index, written = list(sel.index), None
        if cols is not None:
            written = list(cols)
            if sel.mask is not None:  # only the real columns of each stream
                index = [ix[m] for ix, m in zip(sel.index, sel.mask)]
                written = [c[..., m] for c, m in zip(cols, sel.mask)]
        for i, j, r0, block in self._softmax_blocks(cache, index, written):
            torch.index_select(block.t(), 0, sel.index[i],
                               out=out_t[i, j, :, r0:r0 + block.shape[0]])
        return out_t.transpose(-2, -1)

    def _softmax_blocks(self, cache: AttentionCache, index: list[torch.Tensor] | None = None,
                        cols: list[torch.Tensor] | None = None):
        """The softmax of the cached logits by blocks of rows: yields ``(stream, head, first
        row, block)``, the block (n, T) of softmax rows in a work buffer that the next block
        overwrites. ``cols`` (per stream (h, T, K_i)): written into the columns ``index``
        (per stream (K_i,)) of each block of logits first.

        Each block of the T x T logits is read from memory once and its softmax stays in a
        cache-sized buffer, where passes over whole T x T matrices (softmax, then reading the
        result) were the largest cost of a global block. Row-wise: the same numbers as on the
        whole matrix.
        """
        logits = cache.logits
        b, h, t, _ = logits.shape
        rows = max(1, ROW_BLOCK_ELEMENTS // t)
        buf = scratch("eventful.rows", (rows, t), logits.dtype, logits.device)
        for i in range(b):
            for j in range(h):
                for r0 in range(0, t, rows):
                    r1 = min(r0 + rows, t)
                    block = logits[i, j, r0:r1]
                    if cols is not None:
                        block.index_copy_(1, index[i], cols[i][j, r0:r1].to(block.dtype))
                    yield i, j, r0, softmax_(block, out=buf[: r1 - r0])

    def _av_dtype(self, x: torch.Tensor) -> torch.dtype:
        if not self.params.av_half:
            return x.dtype
        return torch.bfloat16 if x.device.type == "cpu" else torch.float16

    def _dense_attention(self, blk: Block, cache: AttentionCache, qkv: torch.Tensor,
                         grid: Grid, prefix: int, ledger: Ledger) -> torch.Tensor:
        attn = blk.attn
        q, k, v = (attn.split_heads(z) for z in qkv.chunk(3, dim=-1))
        b, h, t, c = q.shape
        blocks = _by_blocks(q)
        if blocks:  # straight into state memory (see EventfulState)
            logits = torch.matmul(q * attn.scale, k.transpose(-2, -1),
                                  out=state_empty((b, h, t, t), q.dtype, q.device))
        else:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
        ledger.matmul(h * t * t, c)
        rel = self._rel_terms(blk, q, grid, prefix, ledger)
        if rel is not None:
            ledger.adds(h * t * t * 2)  # both terms added to every logit
            add = add_rel_pos if torch.is_grad_enabled() else add_rel_pos_
            logits = add(logits, *rel, grid)
        cache.logits = logits
        half = self._av_dtype(v)
        ledger.matmul(h * t * c, t)  # A v
        if not blocks:
            # the softmax is transient: the state keeps its transpose
            a = self._logits(cache, transient=True).to(half)
            cache.a_ref_t = a.transpose(-2, -1).contiguous()
            cache.out = (a @ v.to(half)).to(v.dtype)
            return attn.merge_heads(cache.out.clone())
        # by blocks of rows: each block's softmax goes transposed into A_ref and times v into
        # the output while it is in cache (no T x T softmax is written, nor transposed whole)
        cache.a_ref_t = state_empty((b, h, t, t), half, q.device)
        out = state_empty((b, h, t, c), v.dtype, q.device) if half == v.dtype else \
            torch.empty(b, h, t, c, dtype=half, device=q.device)
        v_half = v.to(half).contiguous()
        for i, j, r0, block in self._softmax_blocks(cache):
            r1 = r0 + block.shape[0]
            block = block.to(half)
            cache.a_ref_t[i, j, :, r0:r1].copy_(block.t())
            torch.matmul(block, v_half[i, j], out=out[i, j, r0:r1])
        cache.out = out if half == v.dtype else state_copy(out.to(v.dtype))
        return attn.merge_heads(cache.out.clone())

    def _sparse_attention(self, blk: Block, cache: AttentionCache, qkv: torch.Tensor,
                          qkv_new: torch.Tensor, qkv_old: torch.Tensor, sel: Selection,
                          grid: Grid, prefix: int, ledger: Ledger) -> torch.Tensor:
        """Update the cached attention for the tokens ``sel`` whose qkv changed.

        ``qkv`` is the updated buffer (B, T, 3D); ``qkv_new`` and ``qkv_old`` (B, K, 3D) the
        selected rows after and before the update (equal on padding rows).
        """
        attn = blk.attn
        q, k, v = (attn.split_heads(z) for z in qkv.chunk(3, dim=-1))
        q_s, k_s, v_s = (attn.split_heads(z) for z in qkv_new.chunk(3, dim=-1))
        v_ref = attn.split_heads(qkv_old.chunk(3, dim=-1)[2])
        h, t, c = q.shape[1], q.shape[2], q.shape[3]

        # query-key product: rows S, then columns S (the S x S block is computed twice; the
        # columns are written by _softmax_columns), each with its relative-position terms
        # (the other logits keep theirs, see AttentionCache). The columns are computed
        # transposed, (B, h, K, T): their relative-position terms are then rows of the
        # transposed terms, read with one row index instead of a gather of every element.
        # On the CPU at inference every (B, h, K, T) temporary lives in a work buffer: fresh
        # ones of this size faulted their pages in on every frame.
        b, k_width = q.shape[0], sel.width
        work = _by_blocks(q)

        def buf(tag: str, dtype: torch.dtype = q.dtype) -> torch.Tensor | None:
            return scratch(tag, (b, h, k_width, t), dtype, q.device) if work else None

        rows = torch.matmul(q_s * attn.scale, k.transpose(-2, -1), out=buf("eventful.qk_rows"))
        cols_t = torch.matmul(k_s, (q * attn.scale).transpose(-2, -1),
                              out=buf("eventful.qk_cols"))                # (B, h, K, T)
        count_rows(ledger, sel, 2 * h * t * c, "backbone")
        rel = self._rel_terms(blk, q, grid, prefix, ledger)
        if rel is not None:
            rel_h, rel_w = rel                          # (B, h, T, kh), (B, h, T, kw)
            kw = grid[1]
            rows = add_rel_pos_(rows, sel.rows(rel_h), sel.rows(rel_w), grid)
            for terms, at in ((rel_h, sel.index // kw), (rel_w, sel.index % kw)):
                term_rows = Selection(at).rows(terms.transpose(-2, -1).contiguous(),
                                               out=buf("eventful.rel_columns"))
                cols_t = cols_t.add_(term_rows) if work else cols_t + term_rows
            count_rows(ledger, sel, 2 * 2 * h * t, "backbone")  # both terms, rows and columns
        sel.write_rows(cache.logits, rows)
        count_rows(ledger, sel, 2 * h * t, "overhead")  # rows and columns written
        a_s = self._softmax_columns(cache, sel, cols_t.transpose(-2, -1))  # (B, h, T, K)

        # attention-value product: out += A_new[:, S] dv + dA v_ref[S]; the columns S of
        # A_ref are rows of its transpose
        a_s_t = a_s.transpose(-2, -1)                              # (B, h, K, T)
        if not a_s_t.is_contiguous():
            a_s_t = _copy(scratch("eventful.columns", a_s_t.shape, a_s.dtype, a_s.device), a_s_t)
        ref_rows = sel.rows(cache.a_ref_t, out=buf("eventful.ref_rows", cache.a_ref_t.dtype))
        if work and ref_rows.dtype == a_s_t.dtype:  # into the buffer just read
            d_a_t = torch.sub(a_s_t, ref_rows, out=ref_rows)
        else:
            d_a_t = a_s_t - ref_rows.to(a_s.dtype)
        d_a_t = sel.zero_padding_rows(d_a_t)
        d_v = v_s - v_ref                                          # zero on padding rows
        half = self._av_dtype(v)
        out = cache.out
        out += (a_s.to(half) @ d_v.to(half)).to(out.dtype)
        out += (d_a_t.to(half).transpose(-2, -1) @ v_ref.to(half)).to(out.dtype)
        sel.write_rows(cache.a_ref_t, a_s_t)
        count_rows(ledger, sel, 2 * h * t * c, "backbone")
        # dA and dv subtractions, A_ref columns written; the two additions into the output
        count_rows(ledger, sel, h * t + h * c + h * t, "overhead")
        ledger.add(2 * h * t * c, "overhead")
        return attn.merge_heads(out.clone())


def _by_blocks(qk: torch.Tensor) -> bool:
    """Whether the global-attention softmax runs by blocks of rows: on the CPU at inference
    (a GPU wants one large kernel, not a loop of small ones)."""
    return qk.device.type == "cpu" and not torch.is_grad_enabled()


def _copy(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``source`` copied into ``target``; a transposed copy into a buffer that already
    exists ran 3x faster than ``.contiguous()`` (measured on CPU)."""
    if torch.is_grad_enabled():
        return source.contiguous()
    return target.copy_(source)
