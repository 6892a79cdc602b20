"""Attention paths, relative position and position interpolation against plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.layers import (Attention, _FusedRelPosSoftmax, _rel_pos_index, add_rel_pos_,
                           get_rel_pos, rel_pos_softmax_, rel_pos_terms, softmax_)
from models.vit import ViT

torch.manual_seed(0)


def make_attention(dim=16, heads=2, rel=None, seed=0):
    torch.manual_seed(seed)
    att = Attention(dim, heads, rel_pos_size=rel)
    with torch.no_grad():
        att.qkv.bias.normal_(std=0.5)  # a visible bias: window padding must use it
        if rel is not None:
            att.rel_pos_h.normal_(std=0.3)
            att.rel_pos_w.normal_(std=0.3)
    return att.eval()


def reference_rel_pos_logits(q, rel_pos_h, rel_pos_w, grid):
    """detectron2's decomposed relative position for equal query/key grids, written as a loop:
    logit[(i, j), (k, l)] += q[i, j] . Rh[i - k + H - 1] + q[i, j] . Rw[j - l + W - 1]."""
    h, w = grid
    n = h * w
    out = torch.zeros(*q.shape[:-2], n, n, dtype=q.dtype)
    for i in range(h):
        for j in range(w):
            for k in range(h):
                for m in range(w):
                    rh = rel_pos_h[i - k + h - 1]
                    rw = rel_pos_w[j - m + w - 1]
                    out[..., i * w + j, k * w + m] = (q[..., i * w + j, :] * (rh + rw)).sum(-1)
    return out


def reference_attention(qkv, heads, scale, bias=None):
    """softmax(q k^T * scale + bias) v, heads merged."""
    b, n, three_d = qkv.shape
    d = three_d // 3
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias(q)
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


@pytest.mark.parametrize("case", ["global+class token", "global+rel pos", "windowed+rel pos"])
def test_fused_and_explicit_paths_agree(case):
    grid = (5, 6)
    n = grid[0] * grid[1]
    if case == "global+class token":
        att, prefix, window = make_attention(), 1, 0
    elif case == "global+rel pos":
        att, prefix, window = make_attention(rel=grid), 0, 0
    else:
        att, prefix, window = make_attention(rel=(4, 4)), 0, 4
    qkv = att.qkv(torch.randn(2, prefix + n, 16))
    fused = att.attend(qkv, grid, window, prefix)
    explicit = att.attend(qkv, grid, window, prefix, need_probs=True)
    assert fused.probs is None and explicit.probs is not None
    torch.testing.assert_close(fused.out, explicit.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit.probs.sum(-1), torch.ones(explicit.probs.shape[:-1]))


@pytest.mark.parametrize("shape, k_grid", [((2, 3, 7, 4, 5), (4, 5)), ((6, 2, 9, 3, 3), (3, 3))])
def test_the_fused_kernels_source_computes_the_in_place_path(shape, k_grid):
    """What ``torch.compile`` turns into one kernel on a GPU (rel_pos_softmax_) is the same
    function as the in-place additions and softmax the CPU runs."""
    *lead, nq, kh, kw = shape
    logits = torch.randn(*lead, nq, kh * kw, dtype=torch.float64)
    rel_h = torch.randn(*lead, nq, kh, dtype=torch.float64)
    rel_w = torch.randn(*lead, nq, kw, dtype=torch.float64)
    want = softmax_(add_rel_pos_(logits.clone(), rel_h, rel_w, k_grid))
    got = _FusedRelPosSoftmax._softmax(logits.clone(), rel_h, rel_w, *k_grid)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():  # on the CPU the in-place path itself
        mine = logits.clone()
        assert rel_pos_softmax_(mine, rel_h, rel_w, k_grid) is mine
    torch.testing.assert_close(mine, want, rtol=0, atol=0)


def test_global_relative_position_matches_the_plain_formula():
    grid = (3, 4)
    att = make_attention(rel=grid)
    x = torch.randn(2, 12, 16)
    qkv = att.qkv(x)
    got = att.attend(qkv, grid, 0).out
    want = reference_attention(qkv, 2, att.scale, lambda q: reference_rel_pos_logits(
        q, att.rel_pos_h, att.rel_pos_w, grid))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_windowed_attention_matches_a_naive_per_window_reference():
    """Pad the *input* grid with zeros (as detectron2 does before qkv), cut windows by hand,
    attend inside each with relative position, stitch back, drop the padding."""
    grid, window = (5, 7), 4
    att = make_attention(rel=(window, window))
    x = torch.randn(2, grid[0] * grid[1], 16)
    got = att.attend(att.qkv(x), grid, window).out

    hp, wp = 8, 8  # padded to multiples of the window
    padded = torch.zeros(2, hp, wp, 16)
    padded[:, : grid[0], : grid[1]] = x.view(2, *grid, 16)
    qkv = att.qkv(padded)  # padding rows become the qkv bias
    want = torch.zeros(2, hp, wp, 16)
    for wy in range(0, hp, window):
        for wx in range(0, wp, window):
            win = qkv[:, wy:wy + window, wx:wx + window].reshape(2, window * window, -1)
            out = reference_attention(win, 2, att.scale, lambda q: reference_rel_pos_logits(
                q, att.rel_pos_h, att.rel_pos_w, (window, window)))
            want[:, wy:wy + window, wx:wx + window] = out.view(2, window, window, 16)
    want = want[:, : grid[0], : grid[1]].reshape(2, -1, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_get_rel_pos_scales_and_interpolates_like_detectron2():
    table = torch.randn(2 * 4 - 1, 3)
    # same sizes: a plain lookup of i - j + (k - 1)
    got = get_rel_pos(4, 4, table)
    for i in range(4):
        for j in range(4):
            torch.testing.assert_close(got[i, j], table[i - j + 3])
    # query grid half the key grid: query coordinates are scaled by k / q
    got = get_rel_pos(2, 4, table)
    for i in range(2):
        for j in range(4):
            torch.testing.assert_close(got[i, j], table[int(i * 2.0 - j + 3)])
    # a table of another length is resized linearly to 2 * max(q, k) - 1 first
    resized = F.interpolate(table.t()[None], size=11, mode="linear")[0].t()
    got = get_rel_pos(6, 6, table)
    torch.testing.assert_close(got[5, 0], resized[5 + 5])


def test_rel_pos_lookup_is_built_once_and_serves_inference_and_training():
    # the (q, k) lookup depends on the sizes only: built on first use, then reused
    _rel_pos_index.cache_clear()
    table = torch.randn(7, 3, requires_grad=True)
    with torch.inference_mode():
        first = get_rel_pos(4, 4, table)
    index = _rel_pos_index
    assert index.cache_info().misses == 1
    # the index built under inference mode still works where autograd records
    got = get_rel_pos(4, 4, table)
    assert index.cache_info().hits == 1
    got.sum().backward()
    assert table.grad is not None and float(table.grad.abs().sum()) > 0
    torch.testing.assert_close(got.detach(), first)
    # and it reads the table as it is now, not as it was when the index was built
    with torch.no_grad():
        table.add_(1.0)
    torch.testing.assert_close(get_rel_pos(4, 4, table).detach(), first + 1.0)


def test_rel_pos_terms_count_their_einsums():
    from models.ledger import Ledger

    led = Ledger(1)
    q = torch.randn(1, 2, 12, 8)
    rel_pos_terms(q, (3, 4), (3, 4), torch.randn(5, 8), torch.randn(7, 8), led, per_stream=2)
    assert float(led.macs["backbone"][0]) == 2 * 12 * (3 + 4) * 8


@pytest.mark.parametrize("class_token, grid", [(True, (3, 5)), (False, (6, 6)), (True, (4, 4))])
def test_position_table_is_interpolated_bicubically(class_token, grid):
    vit = ViT(16, 1, 2, class_token=class_token, pretrain_grid=(4, 4)).eval()
    with torch.no_grad():
        vit.pos_embed.normal_()
    table = vit.position_table(grid)
    p = vit.prefix
    assert table.shape == (1, p + grid[0] * grid[1], 16)
    torch.testing.assert_close(table[:, :p], vit.pos_embed[:, :p])
    src = vit.pos_embed[:, p:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    want = F.interpolate(src, size=grid, mode="bicubic", align_corners=False)
    torch.testing.assert_close(table[:, p:], want.permute(0, 2, 3, 1).reshape(1, -1, 16))
    # the table follows new weights (the cache is dropped on load)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    state["pos_embed"] += 1
    vit.load_state_dict(state)
    torch.testing.assert_close(vit.position_table(grid)[:, p:], table[:, p:] + 1)


def test_loading_a_parent_model_refreshes_the_position_cache():
    from models import build_model

    model = build_model(arch="vit-ti", depth=1, dim=16, heads=2, input_size=32, num_classes=3,
                        pretrain_grid=(4, 4))
    before = model.backbone.position_table((2, 2)).clone()  # cached now
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["backbone.pos_embed"] += 1
    model.load_state_dict(state)  # the detector/classifier loads, not the ViT itself
    torch.testing.assert_close(model.backbone.position_table((2, 2)), before + 1)
