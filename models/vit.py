"""Vision transformer backbones: the plain ViT (timm layout), the ViTDet layout and the
VideoMAE joint space-time layout, all built from :mod:`models.layers`.

A backbone turns pixels into tokens with :meth:`ViT.embed` and runs its blocks densely with
:meth:`ViT.forward_blocks`. Pruning methods run the same blocks their own way; they reach the
parts through the attributes named here (``blocks[i].attn.qkv``, ``blocks[i].window`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Block, Grid, PatchEmbed, PatchEmbed3D, resize_pos_embed, sincos_pos_embed
from .ledger import Ledger

#: The usual sizes: (dim, depth, heads).
SIZES: dict[str, tuple[int, int, int]] = {
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
}


def global_block_indexes(depth: int) -> tuple[int, ...]:
    """ViTDet's four evenly spaced global-attention blocks (2, 5, 8, 11 for depth 12)."""
    if depth < 4:
        return tuple(range(depth))
    return tuple((i + 1) * depth // 4 - 1 for i in range(4))


@dataclass
class Embedded:
    """Tokens ready for the blocks, with what pruning methods need to know about them."""

    tokens: torch.Tensor     # (B, P + N, D), position encoding added
    grid: Grid               # token grid of the N grid tokens: (H, W) or (T, H, W)
    patches: torch.Tensor    # (B, N, D) patch embeddings before position encoding
    prefix: int              # P: class token(s) in front of the grid tokens


class ViT(nn.Module):
    """A ViT backbone.

    ``windows``: per block, 0 for global attention or the window size (ViTDet). ``rel_pos``
    adds decomposed relative position to every block (windowed blocks get a table for their
    window, global blocks for ``rel_pos_grid``). ``pos_embed``: ``"learned"`` (a table for
    ``pretrain_grid``, resized bicubically to the input grid, with a class-token slot when
    ``class_token``) or ``"sincos"`` (VideoMAE's fixed table). ``tubelet`` > 0 makes a clip
    backbone whose input is (B, 3, T, H, W).
    """

    def __init__(self, dim: int, depth: int, heads: int, patch: int = 16, in_chans: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, class_token: bool = False,
                 pos_embed: str = "learned", pretrain_grid: tuple[int, int] = (14, 14),
                 windows: list[int] | tuple[int, ...] | None = None, rel_pos: bool = False,
                 rel_pos_grid: tuple[int, int] | None = None, final_norm: bool = True,
                 tubelet: int = 0, norm_eps: float = 1e-6):
        super().__init__()
        self.dim, self.depth, self.heads, self.patch = dim, depth, heads, patch
        self.tubelet = tubelet
        self.prefix = 1 if class_token else 0
        self.pretrain_grid = tuple(pretrain_grid)
        windows = list(windows) if windows is not None else [0] * depth
        if len(windows) != depth:
            raise ValueError(f"windows has {len(windows)} entries for {depth} blocks")
        self.windows = windows
        if tubelet:
            self.patch_embed = PatchEmbed3D(tubelet, patch, in_chans, dim)
        else:
            self.patch_embed = PatchEmbed(patch, in_chans, dim)
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed_kind = pos_embed
        if pos_embed == "learned":
            n = pretrain_grid[0] * pretrain_grid[1] + self.prefix
            self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif pos_embed != "sincos":
            raise ValueError(f"unknown pos_embed {pos_embed!r}")
        rel_grid = tuple(rel_pos_grid or pretrain_grid)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, qkv_bias, window=w,
                  rel_pos_size=((w, w) if w else rel_grid) if rel_pos else None,
                  norm_eps=norm_eps)
            for w in windows)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if final_norm else nn.Identity()
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    # -- embedding ---------------------------------------------------------------------------
    def position_table(self, grid: Grid) -> torch.Tensor:
        """(1, P + N, D) position encoding for ``grid`` (cached per grid, dtype and device)."""
        key = (tuple(grid), self.pos_embed.dtype if self.pos_embed_kind == "learned" else None)
        if self.pos_embed_kind == "sincos":
            n = 1
            for g in grid:
                n *= g
            cached = self._pos_cache.get(key)
            if cached is None:
                cached = sincos_pos_embed(n, self.dim)[None]
                self._pos_cache[key] = cached
            return cached
        if self.training:
            return self._learned_table(grid)
        cached = self._pos_cache.get(key)
        if cached is None or cached.device != self.pos_embed.device:
            cached = self._learned_table(grid).detach()
            self._pos_cache[key] = cached
        return cached

    def _learned_table(self, grid: Grid) -> torch.Tensor:
        prefix = self.pos_embed[:, : self.prefix]
        table = resize_pos_embed(self.pos_embed[:, self.prefix:], self.pretrain_grid, grid[-2:])
        return torch.cat([prefix, table], dim=1)

    def _load_from_state_dict(self, *args, **kwargs):
        # position caches depend on the weights; this hook also runs when a parent model loads
        self._pos_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def embed(self, x: torch.Tensor, ledger: Ledger | None = None) -> Embedded:
        patches, grid = self.patch_embed(x, ledger)
        pos = self.position_table(grid).to(device=patches.device, dtype=patches.dtype)
        tokens = patches + pos[:, self.prefix:]
        if self.prefix:
            cls = (self.cls_token + pos[:, : self.prefix]).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        if ledger is not None:
            ledger.adds(tokens.shape[1] * tokens.shape[2], "patch_embed")
        return Embedded(tokens, grid, patches, self.prefix)

    # -- dense blocks ------------------------------------------------------------------------
    def forward_blocks(self, x: torch.Tensor, grid: Grid, ledger: Ledger | None = None,
                       need_probs: bool = False
                       ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        probs: list[torch.Tensor | None] = []
        for blk in self.blocks:
            x, p = blk(x, grid, self.prefix, ledger, need_probs)
            probs.append(p)
        return x, probs

    def forward(self, x: torch.Tensor, ledger: Ledger | None = None) -> torch.Tensor:
        e = self.embed(x, ledger)
        y, _ = self.forward_blocks(e.tokens, e.grid, ledger)
        return self.norm(y)


def vitdet_backbone(size: str = "b", img_size: int = 1024, window: int = 14,
                    pretrain_grid: tuple[int, int] = (14, 14), **overrides) -> ViT:
    """The ViTDet layout: windowed blocks with global blocks at four evenly spaced depths,
    decomposed relative position, no class token, no final norm."""
    dim, depth, heads = SIZES[size]
    depth = overrides.pop("depth", depth)
    dim = overrides.pop("dim", dim)
    heads = overrides.pop("heads", heads)
    globals_ = overrides.pop("global_blocks", None) or global_block_indexes(depth)
    windows = [0 if i in globals_ else window for i in range(depth)]
    grid = img_size // 16
    return ViT(dim, depth, heads, windows=windows, rel_pos=True, rel_pos_grid=(grid, grid),
               pretrain_grid=pretrain_grid, final_norm=False, **overrides)


def plain_vit(size: str = "b", img_size: int = 224, class_token: bool = True, **overrides) -> ViT:
    """timm / DeiT ViT (class token, learned positions, final norm)."""
    dim, depth, heads = SIZES[size]
    depth = overrides.pop("depth", depth)
    dim = overrides.pop("dim", dim)
    heads = overrides.pop("heads", heads)
    g = img_size // overrides.get("patch", 16)
    overrides.setdefault("pretrain_grid", (g, g))
    return ViT(dim, depth, heads, class_token=class_token, **overrides)


def videomae_backbone(size: str = "b", **overrides) -> ViT:
    """VideoMAE joint space-time ViT: 2x16x16 tubelets, fixed sin-cos positions, no class
    token; the final norm is replaced by ``fc_norm`` after mean pooling (in the recognizer)."""
    dim, depth, heads = SIZES[size]
    depth = overrides.pop("depth", depth)
    dim = overrides.pop("dim", dim)
    heads = overrides.pop("heads", heads)
    return ViT(dim, depth, heads, pos_embed="sincos", tubelet=overrides.pop("tubelet", 2),
               final_norm=False, **overrides)
