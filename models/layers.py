"""Transformer parts with timm's names, each reporting the work it does to a :class:`Ledger`.

Tokens are kept flat, ``(B, P + N, D)``: ``P`` prefix tokens (a class token, or none) followed
by the ``N`` tokens of a ``grid``. Attention runs globally or in square windows over the grid;
window padding is done in the qkv domain with the qkv bias (what a zero-padded input would
give after the qkv projection), so linear layers never run on padding and a pruning method that
buffers qkv can pad the same way.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ledger import Ledger

Grid = tuple[int, ...]  # (H, W) for frames, (T, H, W) for clips


class PatchEmbed(nn.Module):
    """Image to patch tokens (a strided convolution); ``proj`` as in timm."""

    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor, ledger: Ledger | None = None) -> tuple[torch.Tensor, Grid]:
        y = self.proj(x)  # B, D, H, W
        grid = (y.shape[-2], y.shape[-1])
        if ledger is not None:
            ledger.add(conv_macs(self.proj, y), "patch_embed")
        return y.flatten(2).transpose(1, 2), grid


class PatchEmbed3D(nn.Module):
    """Video to tubelet tokens (VideoMAE: 2 x 16 x 16 tubelets)."""

    def __init__(self, tubelet: int, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.tubelet, self.patch = tubelet, patch
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch, patch),
                              stride=(tubelet, patch, patch))

    def forward(self, x: torch.Tensor, ledger: Ledger | None = None) -> tuple[torch.Tensor, Grid]:
        y = self.proj(x)  # B, D, T, H, W
        grid = tuple(y.shape[-3:])
        if ledger is not None:
            ledger.add(conv_macs(self.proj, y), "patch_embed")
        return y.flatten(2).transpose(1, 2), grid


def conv_macs(conv: nn.Module, out: torch.Tensor, inp: torch.Tensor | None = None) -> int:
    """MACs per sample of a convolution that produced ``out`` (bias additions included).

    A transposed convolution scatters every *input* element through its kernel, so its MACs
    follow the input (``inp``; without it, the input size is taken as the output size over
    the stride, exact for ViTDet's stride-equals-kernel upsampling)."""
    bias = out[0].numel() if conv.bias is not None else 0
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        spatial_in = (inp[0, 0].numel() if inp is not None
                      else out[0, 0].numel() // math.prod(conv.stride))
        return (spatial_in * conv.in_channels * (conv.out_channels // conv.groups)
                * math.prod(conv.kernel_size) + bias)
    return out[0].numel() * conv.in_channels // conv.groups * math.prod(conv.kernel_size) + bias


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, ledger: Ledger | None = None,
                tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        if ledger is not None:
            n = x.shape[-2] if tokens is None else tokens
            ledger.linear(self.fc1, n)
            ledger.linear(self.fc2, n)
        return self.fc2(self.act(self.fc1(x)))


# --- relative position (ViTDet / MViTv2 decomposed form) -------------------------------------

def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for ``q_size`` queries and ``k_size`` keys along one axis.

    The table is interpolated linearly when its length does not match (as detectron2 does),
    and the coordinates are scaled when query and key sizes differ.
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        table = F.interpolate(rel_pos.t().unsqueeze(0).float(), size=max_dist, mode="linear")
        table = table.squeeze(0).t().to(rel_pos.dtype)
    else:
        table = rel_pos
    return table[_rel_pos_index(q_size, k_size, rel_pos.device)]  # q_size, k_size, C


@functools.lru_cache(maxsize=64)
def _rel_pos_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """(q_size, k_size) long: the row of the (interpolated) table for each query-key pair.

    Depends on the sizes only, so it is built once per device instead of in seven small
    operations per axis, block and frame. Built outside inference mode, so that training may
    index with it too."""
    with torch.inference_mode(False):
        q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
        k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
        rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
        return rel.long()


def rel_pos_terms(q: torch.Tensor, q_grid: Grid, k_grid: Grid, rel_pos_h: torch.Tensor,
                  rel_pos_w: torch.Tensor, ledger: Ledger | None = None,
                  per_stream: int = 1, category: str = "backbone"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two decomposed relative-position terms for queries ``q`` (..., qh*qw, C).

    Returns ``rel_h`` (..., qh*qw, kh) and ``rel_w`` (..., qh*qw, kw), to be added to the
    attention logits as ``logits.view(..., kh, kw) + rel_h[..., None] + rel_w[..., None, :]``.
    ``per_stream`` is how many query sets of ``q``'s leading dimensions belong to one stream
    (windows x heads), for the ledger.
    """
    qh, qw = q_grid
    kh, kw = k_grid
    rh = get_rel_pos(qh, kh, rel_pos_h)
    rw = get_rel_pos(qw, kw, rel_pos_w)
    lead = q.shape[:-2]
    c = q.shape[-1]
    r_q = q.reshape(*lead, qh, qw, c)
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, rh).reshape(*lead, qh * qw, kh)
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, rw).reshape(*lead, qh * qw, kw)
    if ledger is not None:  # einsum MACs per stream: outputs x C, for both terms
        ledger.matmul(per_stream * qh * qw * (kh + kw), c, category)
    return rel_h, rel_w


def rel_pos_terms_at(q: torch.Tensor, q_index: torch.Tensor, q_grid: Grid, k_grid: Grid,
                     rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                     ledger: Ledger | None = None, category: str = "backbone"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rel_pos_terms` for a subset of the queries of ``q_grid``.

    ``q`` (B, heads, nq, C) are the queries at flat grid positions ``q_index`` (B, nq) (a
    pruning method's kept tokens). Returns ``rel_h`` (B, heads, nq, kh) and ``rel_w``
    (B, heads, nq, kw); only the ``nq`` rows are computed (and counted).
    """
    qw = q_grid[1]
    kh, kw = k_grid
    rh = get_rel_pos(q_grid[0], kh, rel_pos_h)[q_index.div(qw, rounding_mode="floor")]
    rw = get_rel_pos(qw, kw, rel_pos_w)[q_index.remainder(qw)]  # (B, nq, kw, C)
    rel_h = torch.einsum("bhnc,bnkc->bhnk", q, rh)
    rel_w = torch.einsum("bhnc,bnkc->bhnk", q, rw)
    if ledger is not None:
        ledger.matmul(q.shape[1] * q.shape[2] * (kh + kw), q.shape[3], category)
    return rel_h, rel_w


def add_rel_pos(logits: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                k_grid: Grid) -> torch.Tensor:
    """``logits`` (..., Nq, kh*kw) plus the decomposed terms; returns a new tensor."""
    kh, kw = k_grid
    lead = logits.shape[:-1]
    out = logits.view(*lead, kh, kw) + rel_h[..., :, None] + rel_w[..., None, :]
    return out.view(*lead, kh * kw)


def add_rel_pos_(logits: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 k_grid: Grid) -> torch.Tensor:
    """:func:`add_rel_pos` in place on ``logits`` (which must be the caller's own tensor):
    no (..., Nq, kh*kw) bias is ever built."""
    kh, kw = k_grid
    view = logits.view(*logits.shape[:-1], kh, kw)
    view += rel_h[..., :, None]
    view += rel_w[..., None, :]
    return logits


def softmax_(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dimension into ``out``, by default in place on ``x``.

    In place is bit-identical to ``x.softmax(-1)`` on the CPU (each row is read before it is
    written). On other devices an in-place call, and while autograd records any call, returns
    a new tensor instead: use the result, not ``out``.
    """
    if torch.is_grad_enabled() or (out is None and x.device.type != "cpu"):
        return x.softmax(dim=-1)
    return torch._softmax(x, -1, False, out=x if out is None else out)


def rel_pos_softmax_(logits: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                     k_grid: Grid) -> torch.Tensor:
    """``softmax(logits + rel_h + rel_w)`` at inference, ``logits`` being the caller's own.

    On the CPU: :func:`add_rel_pos_` then :func:`softmax_`, in place. On a GPU those are three
    passes over the logits, each a strided broadcast (measured: 2.6 ms for rollout's global
    rows at 32 streams on an H200, docs/BENCHMARKS.md); there one kernel generated by
    ``torch.compile`` reads the logits once and writes the probabilities (1.6 ms), the same
    numbers up to rounding (the additions in float32). Where compiling fails (no C compiler
    for Triton on the node, an unsupported GPU) the in-place path runs, with one warning."""
    if logits.device.type == "cuda" and not torch.is_grad_enabled() and _fused.usable:
        try:
            return _fused(logits, rel_h, rel_w, k_grid)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, once
            _fused.usable = False
            warnings.warn(f"fused relative-position softmax unavailable, running it unfused: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          RuntimeWarning, stacklevel=2)
    return softmax_(add_rel_pos_(logits, rel_h, rel_w, k_grid))


class _FusedRelPosSoftmax:
    """The compiled kernel of :func:`rel_pos_softmax_`, built on first use for each shape.

    Static shapes: with the row length fixed Inductor writes one online-softmax pass per row.
    Compiled with dynamic shapes (one kernel for every block and batch size) it split the row
    reduction and made rollout's backbone 1.4-1.9x *slower* than the unfused path (measured on
    an H200, docs/BENCHMARKS.md). A method sees a few shapes (windowed, global pruned rows,
    global every row) per batch size; past torch's recompilation limit a new shape runs the
    same function uncompiled."""

    usable = True

    def __init__(self) -> None:
        self._compiled = None

    @staticmethod
    def _softmax(logits: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 kh: int, kw: int) -> torch.Tensor:
        view = logits.view(*logits.shape[:-1], kh, kw)
        return (view + rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).softmax(-1)

    def __call__(self, logits: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 k_grid: Grid) -> torch.Tensor:
        if self._compiled is None:
            self._compiled = torch.compile(self._softmax, dynamic=False)
        return self._compiled(logits, rel_h, rel_w, k_grid[0], k_grid[1])


_fused = _FusedRelPosSoftmax()
_scratch = threading.local()


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str) -> torch.Tensor:
    """An uninitialised work tensor that, at inference, the next call with the same ``tag``
    (in this thread) hands out again: its user must be done with it by then. While autograd
    records (training), a new tensor every call.

    Attention at detection resolutions needs temporaries of tens of megabytes (a ViTDet-S
    global block at 672: 6 x 1764 x 1764 floats, 75 MB). Allocated afresh, each is a new
    mapping whose pages fault in on first touch, which on CPU took as long as the arithmetic
    that fills them (measured: 33 ms vs 12 ms to build that bias). One buffer per tag, grown
    to the largest size asked for; :func:`release_scratch` frees them.
    """
    device = torch.device(device)
    if device.type == "meta" or torch.is_grad_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    # inference tensors cannot be written outside inference mode (nor normal ones be used
    # as freely inside it): one buffer per mode
    key = (tag, dtype, device, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the smaller one before taking the larger
        buf = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buf
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Free this thread's work buffers (memory measurements, long-lived workers)."""
    _scratch.__dict__.pop("buffers", None)


# --- windows -------------------------------------------------------------------------------

def window_partition(x: torch.Tensor, grid: Grid, window: int, pad_value: torch.Tensor | None
                     ) -> tuple[torch.Tensor, Grid]:
    """(B, H*W, C) -> (B * nW, window*window, C), padding the grid to a multiple of ``window``.

    Padded positions take ``pad_value`` (C,) (for qkv: the qkv bias), or zeros.
    Returns the windows and the padded grid.
    """
    b, _, c = x.shape
    h, w = grid
    x = x.view(b, h, w, c)
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        hp, wp = h + ph, w + pw
        fill = x.new_zeros(b, hp, wp, c)
        if pad_value is not None:
            fill[:] = pad_value.to(x.dtype)
        fill[:, :h, :w] = x
        x = fill
    else:
        hp, wp = h, w
    x = x.view(b, hp // window, window, wp // window, window, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)
    return x, (hp, wp)


def window_unpartition(x: torch.Tensor, batch: int, grid: Grid, padded: Grid,
                       window: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nW, window*window, C) -> (B, H*W, C)."""
    h, w = grid
    hp, wp = padded
    c = x.shape[-1]
    x = x.view(batch, hp // window, wp // window, window, window, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, c)
    if hp != h or wp != w:
        x = x[:, :h, :w]
    return x.reshape(batch, h * w, c)


# --- attention -----------------------------------------------------------------------------

@dataclass
class AttentionOutput:
    out: torch.Tensor                   # (B, P+N, D), heads merged, before the projection
    probs: torch.Tensor | None = None   # (B*nW, heads, n, n) when asked for


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` and ``proj`` Linear layers (timm names).

    Optional decomposed relative position (``rel_pos_h``/``rel_pos_w``, ViTDet) for a grid of
    ``rel_pos_size``; global or windowed. Uses PyTorch's fused kernel unless the caller asks for
    the attention probabilities (attention rollout needs them).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 rel_pos_size: tuple[int, int] | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = rel_pos_size is not None
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, n, D) -> (B, heads, n, head_dim)."""
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def merge_heads(t: torch.Tensor) -> torch.Tensor:
        b, h, n, c = t.shape
        return t.transpose(1, 2).reshape(b, n, h * c)

    def qkv_pad_value(self) -> torch.Tensor | None:
        return None if self.qkv.bias is None else self.qkv.bias.detach()

    def attend(self, qkv: torch.Tensor, grid: Grid, window: int, prefix: int = 0,
               ledger: Ledger | None = None, need_probs: bool = False,
               key_mask: torch.Tensor | None = None,
               probs_transient: bool = False) -> AttentionOutput:
        """Dense attention from projected ``qkv`` (B, P+N, 3D); returns merged heads (B, P+N, D).

        ``window`` > 0 partitions the 2-D grid into windows (no prefix tokens allowed then).
        ``key_mask`` (B, P+N) bool: False tokens are excluded as keys (learned gates); the
        window padding stays a key, as in the dense model. ``probs_transient``: see
        :meth:`core`.
        """
        b = qkv.shape[0]
        if window:
            if prefix:
                raise ValueError("windowed attention does not take prefix tokens")
            qkv_w, padded = window_partition(qkv, grid, window, self.qkv_pad_value())
            n_windows = qkv_w.shape[0] // b
            q_grid = (window, window)
            if key_mask is not None:
                key_mask, _ = window_partition(key_mask[..., None], grid, window,
                                               key_mask.new_ones(1))
                key_mask = key_mask[..., 0]
        else:
            qkv_w, padded, n_windows = qkv, None, 1
            q_grid = grid if (self.use_rel_pos and not prefix) else None
        q, k, v = (self.split_heads(t) for t in qkv_w.chunk(3, dim=-1))
        out, probs = self.core(q, k, v, q_grid, q_grid, ledger=ledger,
                               per_stream=n_windows, need_probs=need_probs, key_mask=key_mask,
                               probs_transient=probs_transient)
        out = self.merge_heads(out)
        if window:
            out = window_unpartition(out, b, grid, padded, window)
        return AttentionOutput(out, probs)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_grid: Grid | None,
             k_grid: Grid | None, ledger: Ledger | None = None, per_stream: int = 1,
             need_probs: bool = False, key_mask: torch.Tensor | None = None,
             attn_bias: torch.Tensor | None = None,
             rel_terms: tuple[torch.Tensor, torch.Tensor] | None = None,
             probs_transient: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(q k^T * scale + rel_pos) v for q (b, h, nq, c), k/v (b, h, nk, c).

        ``per_stream``: how many of the ``b`` attention batches belong to one stream (windows).
        ``key_mask`` (b, nk) bool: False keys are excluded (used for ragged batches).
        ``attn_bias`` (b, h, nq, nk): added to the logits (relative position of gathered
        tokens, computed and counted by the caller).
        ``rel_terms``: the decomposed relative-position terms ``(rel_h, rel_w)`` of these
        queries against the keys of ``k_grid``, computed and counted (einsums and additions)
        by the caller (queries that are a subset of the grid); added like the terms computed
        here, without building a (b, h, nq, nk) bias when the probabilities are asked for.
        ``probs_transient``: the caller is done with the probabilities before the next call
        (at inference they then live in a reused work buffer).
        """
        b, h, nq, c = q.shape
        nk = k.shape[2]
        rel = rel_terms
        if rel is None and self.use_rel_pos and q_grid is not None:
            rel = rel_pos_terms(q, q_grid, k_grid, self.rel_pos_h, self.rel_pos_w, ledger,
                                per_stream=per_stream * h)
            if ledger is not None:
                ledger.adds(per_stream * h * nq * nk * 2)  # both terms added to every logit
        neg = None
        if key_mask is not None:
            # a query set with every key excluded (a window of pruned tokens) would softmax
            # over nothing: let it see all keys instead; its rows belong to excluded tokens,
            # which callers discard, and NaN never enters the computation (or its gradients)
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
            neg = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            neg.masked_fill_(~key_mask, float("-inf"))
            neg = neg[:, None, None, :]
        if ledger is not None:
            ledger.matmul(per_stream * h * nq * nk, c)  # q k^T
            ledger.matmul(per_stream * h * nq * c, nk)  # attn v
        if need_probs:
            # heads split from a packed qkv are strided views: batched products on them copy
            # internally per call and ran 1.5x slower than on one contiguous copy
            k, v = k.contiguous(), v.contiguous()
            if probs_transient and not torch.is_grad_enabled():
                logits = torch.matmul(q * self.scale, k.transpose(-2, -1), out=scratch(
                    "attention.probs", (b, h, nq, nk), q.dtype, q.device))
            else:
                logits = (q * self.scale) @ k.transpose(-2, -1)
            if torch.is_grad_enabled():
                bias = self._bias(rel, k_grid, attn_bias, neg, (b, h, nq, nk), q)
                probs = (logits if bias is None else logits + bias).softmax(dim=-1)
            elif rel is not None and attn_bias is None and neg is None:
                probs = rel_pos_softmax_(logits, *rel, k_grid)  # one pass on a GPU
            else:  # inference: the logits are ours, add the terms and normalise in place
                if rel is not None:
                    add_rel_pos_(logits, *rel, k_grid)
                for term in (attn_bias, neg):
                    if term is not None:
                        logits += term
                probs = softmax_(logits)
            return probs @ v, probs
        bias = self._bias(rel, k_grid, attn_bias, neg, (b, h, nq, nk), q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None

    @staticmethod
    def _bias(rel: tuple[torch.Tensor, torch.Tensor] | None, k_grid: Grid | None,
              attn_bias: torch.Tensor | None, neg: torch.Tensor | None,
              shape: tuple[int, ...], q: torch.Tensor) -> torch.Tensor | None:
        """What the logits get: relative position, plus ``attn_bias``, plus the key mask.
        At inference the relative-position sum is built in a reused work buffer."""
        in_buffer = False  # whether ``bias`` is the work buffer (then updated in place)
        if rel is None:
            bias = attn_bias
        else:
            rel_h, rel_w = rel
            kh, kw = k_grid
            if torch.is_grad_enabled():
                bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(shape)
                if attn_bias is not None:
                    bias = bias + attn_bias
            else:
                bias = scratch("attention.bias", shape, rel_h.dtype, rel_h.device)
                torch.add(rel_h[..., :, None], rel_w[..., None, :],
                          out=bias.view(*shape[:-1], kh, kw))
                in_buffer = True
                if attn_bias is not None:
                    bias += attn_bias
        if neg is not None:
            if bias is None:
                bias = neg
            elif in_buffer:
                bias += neg
            else:
                bias = bias + neg
        return None if bias is None else bias.to(q.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: ``norm1, attn, norm2, mlp`` (timm / detectron2 names)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 window: int = 0, rel_pos_size: tuple[int, int] | None = None,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: Grid, prefix: int = 0,
                ledger: Ledger | None = None, need_probs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense block; returns the new tokens and (if asked) the attention probabilities."""
        x, _, probs = self.forward_qkv(x, grid, prefix, ledger, need_probs)
        return x, probs

    def forward_qkv(self, x: torch.Tensor, grid: Grid, prefix: int = 0,
                    ledger: Ledger | None = None, need_probs: bool = False,
                    key_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As :meth:`forward`, also returning the block's qkv projection (B, P+N, 3D) (methods
        that score tokens by their keys reuse it). ``key_mask`` (B, P+N) bool excludes the
        False tokens as keys (their own rows are still computed)."""
        n, d = x.shape[1], x.shape[2]
        qkv = self.attn.qkv(self.norm1(x))
        att = self.attn.attend(qkv, grid, self.window, prefix, ledger, need_probs, key_mask)
        x = x + self.attn.proj(att.out)
        if torch.is_grad_enabled():
            x = x + self.mlp(self.norm2(x), ledger)
        else:  # x is the sum made just above: add into it (no new (B, N, D) tensor)
            x += self.mlp(self.norm2(x), ledger)
        if ledger is not None:
            ledger.linear(self.attn.qkv, n)
            ledger.linear(self.attn.proj, n)
            ledger.adds(2 * n * d)  # the two residual additions
            ledger.processed(n)
        return x, qkv, att.probs


def sincos_pos_embed(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sin-cos table VideoMAE uses (its ``get_sinusoid_encoding_table``)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


def resize_pos_embed(pos: torch.Tensor, src_grid: tuple[int, int],
                     dst_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1, H*W, D) grid position table (no prefix slots) to ``dst_grid``."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, src_grid[0], src_grid[1], d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=dst_grid, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], d).to(pos.dtype)
