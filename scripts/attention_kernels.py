"""What ViTDet's relative-position attention costs on a device, kernel by kernel.

Times, on random tensors of one attention layer's shapes, the ways the models run or could run
``softmax(q k^T * scale + rel_h + rel_w)`` (rel_h, rel_w: the decomposed relative-position
terms, one per key row and one per key column):

- ``probs eager``: what the pruning methods run when they need the probabilities (rollout, the
  recognizer's rollout, eventful's rows): the product into a logits tensor, both terms added
  in place (``models.layers.add_rel_pos_``), softmax in place (``softmax_``);
- ``probs fused``: ``models.layers.rel_pos_softmax_``, what rollout now runs: on a GPU the
  additions and the softmax as one kernel compiled for the shape (on the CPU it is the eager
  path above);
- ``dense bias``: what the dense model runs: the terms summed into a (B, h, Nq, Nk) bias for
  PyTorch's fused attention (``scaled_dot_product_attention``), and the attention output;
- ``dense no bias``: the terms folded into the product instead (the queries get ``rel_h`` and
  ``rel_w`` divided by the scale as extra channels, the keys one-hot channels for their row and
  column), so the fused kernel needs no bias; the same output up to rounding.

Prints the median milliseconds per call of each (CUDA events on a GPU) and the largest
difference of each from the eager reference, for the global shape (``--rows`` queries of the
full grid) and the windowed shape (14 x 14 windows). Nothing here changes what the models run.

    PYTHONPATH=. python scripts/attention_kernels.py --device cuda --dtype float16 \\
        --batch 32 --grid 42 --rows 384
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.layers import add_rel_pos_, rel_pos_softmax_, softmax_  # noqa: E402


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def one_hot_keys(k: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Keys (b, h, kh*kw, c) with one-hot channels for their row and column appended."""
    rows = torch.arange(kh, device=k.device).repeat_interleave(kw)
    cols = torch.arange(kw, device=k.device).repeat(kh)
    onehot = torch.cat([F.one_hot(rows, kh), F.one_hot(cols, kw)], 1).to(k.dtype)
    return torch.cat([k, onehot.expand(*k.shape[:2], -1, -1)], -1)


def pad_channels(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    extra = -x.shape[-1] % multiple
    return F.pad(x, (0, extra)) if extra else x


def compare(name: str, b: int, heads: int, nq: int, grid: int, c: int, device: torch.device,
            dtype: torch.dtype, repeats: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    kh = kw = grid
    nk = kh * kw
    scale = c ** -0.5
    q, k, v = rand(b, heads, nq, c), rand(b, heads, nk, c), rand(b, heads, nk, c)
    rel_h, rel_w = rand(b, heads, nq, kh), rand(b, heads, nq, kw)
    logits = torch.empty(b, heads, nq, nk, device=device, dtype=dtype)

    def probs_eager() -> torch.Tensor:
        torch.matmul(q * scale, k.transpose(-2, -1), out=logits)
        add_rel_pos_(logits, rel_h, rel_w, (kh, kw))
        return softmax_(logits)

    def probs_fused() -> torch.Tensor:
        torch.matmul(q * scale, k.transpose(-2, -1), out=logits)
        return rel_pos_softmax_(logits, rel_h, rel_w, (kh, kw))

    def dense_bias() -> torch.Tensor:
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).view(b, heads, nq, nk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    k_aug = pad_channels(one_hot_keys(k, kh, kw))

    def dense_no_bias() -> torch.Tensor:
        q_aug = pad_channels(torch.cat([q, rel_h / scale, rel_w / scale], -1))
        return F.scaled_dot_product_attention(q_aug, k_aug, v, scale=scale)

    reference = probs_eager().float().clone()
    out_reference = dense_bias().float()
    print(f"{name}: q {tuple(q.shape)}, keys {nk}, {dtype}, {device}")
    for label, fn, ref in (("probs eager", probs_eager, reference),
                           ("probs fused", probs_fused, reference),
                           ("dense bias", dense_bias, out_reference),
                           ("dense no bias", dense_no_bias, out_reference)):
        try:
            diff = (fn().float() - ref).abs().max().item()
            ms = timed(fn, device, repeats)
        except Exception as exc:  # a kernel this device or build lacks: say so, go on
            print(f"  {label:14s} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        print(f"  {label:14s} {ms:8.3f} ms   max |diff| {diff:.2e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=2, help="streams (default 2)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--grid", type=int, default=42, help="tokens per side (default 42: 672 px)")
    p.add_argument("--rows", type=int, default=384,
                   help="query rows of the global block (default 384: rollout's k)")
    p.add_argument("--window", type=int, default=14)
    p.add_argument("--channels", type=int, default=64, help="per head (default 64)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    windows = args.batch * math.ceil(args.grid / args.window) ** 2
    with torch.inference_mode():
        compare("global, pruned rows", args.batch, args.heads, args.rows, args.grid,
                args.channels, device, dtype, args.repeats)
        compare("global, every row", args.batch, args.heads, args.grid ** 2, args.grid,
                args.channels, device, dtype, args.repeats)
        compare("windowed", windows, args.heads, args.window ** 2, args.window,
                args.channels, device, dtype, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
