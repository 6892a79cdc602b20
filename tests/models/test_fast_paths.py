"""The inference fast paths (work buffers, in-place terms and softmax, transposed caches) give
the numbers of the plain paths they replace."""

from __future__ import annotations

import pytest
import torch

from models.layers import (Attention, rel_pos_terms, rel_pos_terms_at, release_scratch, scratch,
                           softmax_)
from models.ledger import Ledger
from models.methods import build_method
from models.methods.eventful import AttentionCache
from models.methods.gates import Selection
from models.vit import vitdet_backbone


def make_attention(dim=32, heads=4, rel=(6, 5), seed=0) -> Attention:
    torch.manual_seed(seed)
    att = Attention(dim, heads, rel_pos_size=rel)
    with torch.no_grad():
        att.rel_pos_h.normal_(std=0.5)
        att.rel_pos_w.normal_(std=0.5)
    return att.eval()


def qkv_heads(att: Attention, b: int, n: int, seed: int = 1):
    torch.manual_seed(seed)
    return [torch.randn(b, att.num_heads, n, att.head_dim) for _ in range(3)]


@pytest.mark.parametrize("need_probs", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_core_at_inference_equals_the_recording_path(need_probs, mask):
    """Inference builds the bias in a work buffer (fused kernel) or adds the terms and
    normalises in place (probabilities asked for); while autograd records, plain new
    tensors. Same numbers, and the same ledger."""
    att = make_attention()
    grid = (6, 5)
    q, k, v = qkv_heads(att, 2, 30)
    key_mask = torch.rand(2, 30) > 0.3 if mask else None
    outs = []
    for grad in (True, False):
        ledger = Ledger(2)
        with torch.set_grad_enabled(grad):
            out, probs = att.core(q, k, v, grid, grid, ledger, need_probs=need_probs,
                                  key_mask=key_mask)
        outs.append((out.detach(), None if probs is None else probs.detach(), ledger))
    (ref, ref_p, ref_led), (fast, fast_p, fast_led) = outs
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    if need_probs:
        torch.testing.assert_close(fast_p, ref_p, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast_led.run_macs(), ref_led.run_macs())


def test_core_takes_relative_position_terms_of_a_query_subset():
    """``rel_terms`` of gathered queries (a pruning method's kept tokens) give the rows the
    full grid gives for those queries, with the probabilities and without."""
    att = make_attention()
    grid = (6, 5)
    q, k, v = qkv_heads(att, 2, 30)
    index = torch.stack([torch.tensor([0, 4, 7, 29]), torch.tensor([3, 5, 11, 12])])
    q_kept = q.gather(2, index[:, None, :, None].expand(-1, att.num_heads, -1, att.head_dim))
    with torch.inference_mode():
        full, full_p = att.core(q, k, v, grid, grid, need_probs=True)
        terms = rel_pos_terms_at(q_kept, index, grid, grid, att.rel_pos_h, att.rel_pos_w)
        for need in (True, False):
            out, probs = att.core(q_kept, k, v, None, grid, need_probs=need, rel_terms=terms)
            rows = index[:, None, :, None]
            torch.testing.assert_close(
                out, full.gather(2, rows.expand(-1, att.num_heads, -1, att.head_dim)))
            if need:
                torch.testing.assert_close(
                    probs, full_p.gather(2, rows.expand(-1, att.num_heads, -1, 30)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_softmax_in_place_is_bit_identical(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 50, 70, dtype=dtype) * 4
    ref = x.softmax(-1)
    with torch.inference_mode():
        y = x.clone()
        assert softmax_(y) is y and torch.equal(y, ref)
        out = torch.empty_like(x)
        assert torch.equal(softmax_(x, out=out), ref) and torch.equal(out, ref)


def test_scratch_is_reused_at_inference_only():
    release_scratch()
    with torch.inference_mode():
        a = scratch("test", (4, 5), torch.float32, "cpu")
        b = scratch("test", (2, 3), torch.float32, "cpu")  # smaller: the same memory
        assert b.data_ptr() == a.data_ptr() and b.shape == (2, 3)
        c = scratch("test", (10, 10), torch.float32, "cpu")  # larger: a new buffer
        assert c.shape == (10, 10) and c.data_ptr() != a.data_ptr()
        assert scratch("other", (4, 5), torch.float32, "cpu").data_ptr() != c.data_ptr()
    with torch.no_grad():  # not an inference tensor: written outside inference mode
        d = scratch("test", (4, 5), torch.float32, "cpu")
        d.fill_(1.0)
        assert not d.is_inference()
    e = scratch("test", (4, 5), torch.float32, "cpu")  # autograd records: always new
    assert e.data_ptr() != scratch("test", (4, 5), torch.float32, "cpu").data_ptr()
    release_scratch()


def reference_sparse_update(qk, a_old, out_old, q, k, v_old, v_new, index, scale, rel):
    # index: per stream, the positions updated
    """Eventful Transformers' sparse attention update on plain (b, h, T, T) tensors: rows and
    columns S of q k^T recomputed, relative position added afterwards, dense softmax, and
    out += A_new[:, S] dv + (A_new[:, S] - A_ref[:, S]) v_ref[S]."""
    qk = qk.clone()
    for bi in range(q.shape[0]):
        s = index[bi]
        qk[bi][:, s, :] = (q[bi][:, s] * scale) @ k[bi].transpose(-2, -1)
        qk[bi][:, :, s] = (q[bi] * scale) @ k[bi][:, s].transpose(-2, -1)
    a_new = (qk + rel).softmax(-1)
    out = out_old.clone()
    for bi in range(q.shape[0]):
        s = index[bi]
        a_s, a_ref_s = a_new[bi][..., s], a_old[bi][..., s]
        out[bi] += a_s @ (v_new[bi][:, s] - v_old[bi][:, s]) + (a_s - a_ref_s) @ v_old[bi][:, s]
    return qk, a_new, out


@pytest.mark.parametrize("row_blocks, ragged", [(False, False), (True, False), (True, True)])
def test_eventful_sparse_attention_matches_the_plain_update(monkeypatch, row_blocks, ragged):
    """The cached logits (relative position rewritten for the rows and columns S only), the
    attention matrix kept transposed, the work-buffer softmax and the row/column exchanges
    give the paper's update (two steps, two streams; the softmax in one block of rows or in
    several, with the columns S written into each block before its softmax; a ragged
    selection whose padding rows are unchanged tokens)."""
    from models.methods import eventful

    if row_blocks:
        monkeypatch.setattr(eventful, "ROW_BLOCK_ELEMENTS", 5 * 36)  # blocks of 5 rows
    torch.manual_seed(0)
    backbone = vitdet_backbone("ti", img_size=96, window=3, depth=2, global_blocks=(1,)).eval()
    blk = backbone.blocks[1]
    with torch.no_grad():
        blk.attn.rel_pos_h.normal_(std=0.3)
        blk.attn.rel_pos_w.normal_(std=0.3)
    method = build_method("eventful", r=7)
    grid = (6, 6)
    t, d = 36, backbone.dim
    attn = blk.attn
    cache = AttentionCache()
    qkv = torch.randn(2, t, 3 * d)

    def split(x):
        return [attn.split_heads(z) for z in x.chunk(3, dim=-1)]

    def rel_of(x):
        q = split(x)[0]
        rh, rw = rel_pos_terms(q, grid, grid, attn.rel_pos_h, attn.rel_pos_w)
        return (rh[..., :, None] + rw[..., None, :]).reshape(2, attn.num_heads, t, t)

    with torch.inference_mode():
        method._dense_attention(blk, cache, qkv, grid, 0, Ledger(2))
        q, k, v = split(qkv)
        qk_ref = (q * attn.scale) @ k.transpose(-2, -1)
        a_ref = (qk_ref + rel_of(qkv)).softmax(-1)
        out_ref = a_ref @ v
        for step in range(2):
            index = torch.stack([torch.randperm(t)[:7] for _ in range(2)])
            mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3]) if ragged else None
            sel = Selection(index, mask)
            new = qkv.clone()
            change = torch.randn(2, 7, 3 * d)
            if ragged:  # padding rows carry their old qkv
                change *= mask[..., None]
            rows = sel.rows(qkv) + change
            new.view(-1, 3 * d)[(torch.arange(2)[:, None] * t + index).reshape(-1)] = \
                rows.reshape(-1, 3 * d)
            old_rows = sel.rows(qkv)
            merged = method._sparse_attention(blk, cache, new, rows, old_rows, sel, grid, 0,
                                              Ledger(2))
            q, k, v_new = split(new)
            v_old = split(qkv)[2]
            real = [ix[m] for ix, m in zip(index, mask)] if ragged else list(index)
            qk_ref, a_new, out_ref = reference_sparse_update(
                qk_ref, a_ref, out_ref, q, k, v_old, v_new, real, attn.scale, rel_of(new))
            # the cache holds the logits: the product plus this frame's relative position
            torch.testing.assert_close(cache.logits, qk_ref + rel_of(new), rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(cache.out, out_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(merged, attn.merge_heads(out_ref), rtol=1e-5, atol=1e-5)
            # A_ref: columns S from this frame, the others as they were
            for bi in range(2):
                a_ref[bi][..., real[bi]] = a_new[bi][..., real[bi]]
            torch.testing.assert_close(cache.a_ref_t.transpose(-2, -1), a_ref,
                                       rtol=1e-5, atol=1e-6)
            qkv = new


def test_transient_probabilities_share_a_buffer_and_equal_fresh_ones():
    """Rollout fuses each block's probabilities before the next block runs; they then live
    in one reused buffer instead of a new tensor per block."""
    att = make_attention()
    grid = (6, 5)
    q, k, v = qkv_heads(att, 2, 30)
    with torch.inference_mode():
        ref_out, ref_p = att.core(q, k, v, grid, grid, need_probs=True)
        ref_p = ref_p.clone()
        out, p1 = att.core(q, k, v, grid, grid, need_probs=True, probs_transient=True)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(p1, ref_p, rtol=0, atol=0)
        _, p2 = att.core(q[:, :, :7], k, v, None, grid, need_probs=True, probs_transient=True,
                         rel_terms=rel_pos_terms_at(q[:, :, :7], torch.arange(7).expand(2, 7),
                                                    grid, grid, att.rel_pos_h, att.rel_pos_w))
        assert p2.data_ptr() == p1.data_ptr()
        torch.testing.assert_close(p2, ref_p[:, :, :7])


def test_eventful_softmax_columns_by_row_blocks_equal_the_whole_matrix(monkeypatch):
    """The dense softmax computed block of rows by block of rows (several blocks here, one
    stream with a ragged selection) gives exactly the whole-matrix numbers."""
    from models.methods import eventful

    torch.manual_seed(0)
    method = build_method("eventful", r=7)
    t = 36
    cache = AttentionCache(logits=torch.randn(2, 3, t, t))
    sel = Selection(torch.stack([torch.arange(0, 35, 5), torch.arange(1, 8)]),
                    torch.tensor([[True] * 7, [True] * 4 + [False] * 3]))
    with torch.inference_mode():
        whole = sel.columns(method._logits(cache, transient=True)).clone()
        monkeypatch.setattr(eventful, "ROW_BLOCK_ELEMENTS", 5 * t)  # blocks of 5 rows
        blocks = method._softmax_columns(cache, sel)
    assert torch.equal(blocks, whole)
    torch.testing.assert_close(whole, sel.columns(cache.logits.softmax(-1)), rtol=0, atol=0)


@pytest.mark.parametrize("av_half", [False, True])
def test_eventful_first_frame_by_row_blocks_fills_the_state(monkeypatch, av_half):
    """A stream's first frame in a global block, by blocks of rows: the cached logits, the
    transposed attention matrix and the output are the plain formulas' (several blocks)."""
    from models.methods import eventful

    torch.manual_seed(0)
    backbone = vitdet_backbone("ti", img_size=96, window=3, depth=2, global_blocks=(1,)).eval()
    blk = backbone.blocks[1]
    attn = blk.attn
    with torch.no_grad():
        attn.rel_pos_h.normal_(std=0.3)
        attn.rel_pos_w.normal_(std=0.3)
    method = build_method("eventful", r=7, av_half=av_half)
    grid, t = (6, 6), 36
    qkv = torch.randn(2, t, 3 * backbone.dim)
    monkeypatch.setattr(eventful, "ROW_BLOCK_ELEMENTS", 7 * t)  # blocks of 7 rows
    cache = AttentionCache()
    with torch.inference_mode():
        merged = method._dense_attention(blk, cache, qkv, grid, 0, Ledger(2))
    q, k, v = (attn.split_heads(z) for z in qkv.chunk(3, dim=-1))
    rh, rw = rel_pos_terms(q, grid, grid, attn.rel_pos_h, attn.rel_pos_w)
    qk = (q * attn.scale) @ k.transpose(-2, -1)
    a = (qk + (rh[..., :, None] + rw[..., None, :]).reshape(2, attn.num_heads, t, t)).softmax(-1)
    half = torch.bfloat16 if av_half else torch.float32
    tol = {"rtol": 2e-2, "atol": 2e-2} if av_half else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(cache.logits, qk + (rh[..., :, None] + rw[..., None, :]).reshape(
        2, attn.num_heads, t, t))
    assert cache.a_ref_t.dtype == half
    torch.testing.assert_close(cache.a_ref_t.float(), a.transpose(-2, -1), **tol)
    torch.testing.assert_close(cache.out, a @ v, **tol)
    torch.testing.assert_close(merged, attn.merge_heads(a @ v), **tol)
