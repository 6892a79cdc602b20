"""Video recognizers: VideoMAE's joint space-time ViT and ViViT's factorised encoder."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Block
from .ledger import Ledger
from .vit import ViT


class VideoMAERecognizer(nn.Module):
    """Joint space-time ViT on clips of ``clip_frames`` frames (2x16x16 tubelets), mean
    pooling over all tokens, ``fc_norm``, linear head. A *clip* model: the backbone runs once
    per clip."""

    task = "recognition"
    kind = "clip"

    def __init__(self, backbone: ViT, num_classes: int, class_names: list[str],
                 clip_frames: int = 16, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.clip_frames = clip_frames
        self.fc_norm = nn.LayerNorm(backbone.dim, eps=1e-6)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.dim, num_classes)
        self.class_names = list(class_names)

    def forward_head(self, tokens: torch.Tensor, ledger: Ledger | None = None,
                     token_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Mean-pool the (kept) tokens, ``fc_norm``, classify. ``token_counts`` (B,) gives the
        real token count per clip when ``tokens`` carries zero padding rows (ragged batches)."""
        if token_counts is None:
            pooled = tokens.mean(dim=1)
        else:
            pooled = tokens.sum(dim=1) / token_counts.to(tokens.dtype)[:, None]
        if ledger is not None:
            ledger.linear(self.head, 1, "head")
        return self.head(self.head_drop(self.fc_norm(pooled)))

    def forward(self, clips: torch.Tensor, ledger: Ledger | None = None) -> torch.Tensor:
        """Dense logits for preprocessed clips (B, 3, T, H, W)."""
        e = self.backbone.embed(clips, ledger)
        tokens, _ = self.backbone.forward_blocks(e.tokens, e.grid, ledger)
        return self.forward_head(tokens, ledger)


class ViViTRecognizer(nn.Module):
    """ViViT factorised encoder: a spatial ViT with a class token runs on every time step (a
    *frame* model, so temporal pruning methods apply to it), then a temporal transformer over
    the per-step class tokens of a clip, with its own class token, and a linear head.

    A time step is ``tubelet`` consecutive frames (the published ViViT-B weights embed 2x16x16
    tubelets): the spatial ViT takes them stacked channel-major, ``3 * tubelet`` channels, which
    is the tubelet Conv3d as a Conv2d. ``clip_frames`` counts frames; the temporal model sees
    ``clip_frames // tubelet`` steps.
    """

    task = "recognition"
    kind = "frame"

    def __init__(self, spatial: ViT, temporal_depth: int, num_classes: int,
                 class_names: list[str], clip_frames: int = 32, dropout: float = 0.0,
                 tubelet: int = 1):
        super().__init__()
        if clip_frames % tubelet:
            raise ValueError(f"clip_frames {clip_frames} is not a multiple of tubelet {tubelet}")
        dim = spatial.dim
        self.backbone = spatial
        self.clip_frames = clip_frames
        self.tubelet = tubelet
        self.clip_steps = clip_frames // tubelet
        self.temporal_cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.temporal_pos = nn.Parameter(torch.zeros(1, self.clip_steps + 1, dim))
        nn.init.trunc_normal_(self.temporal_pos, std=0.02)
        self.temporal = nn.ModuleList(Block(dim, spatial.heads) for _ in range(temporal_depth))
        self.temporal_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)
        self.class_names = list(class_names)

    def frame_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The spatial model's output for one frame: its normalised class token (B, D)."""
        return self.backbone.norm(tokens[:, 0])

    def forward_temporal(self, frame_embeddings: torch.Tensor,
                         ledger: Ledger | None = None) -> torch.Tensor:
        """(B, T, D) per-frame class tokens to logits (B, classes); counted as backbone."""
        b, t, d = frame_embeddings.shape
        x = torch.cat([self.temporal_cls.expand(b, -1, -1), frame_embeddings], dim=1)
        pos = self.temporal_pos
        if pos.shape[1] != t + 1:  # clips shorter than trained: use the first positions
            pos = pos[:, : t + 1]
        x = x + pos
        if ledger is not None:
            ledger.adds(x.shape[1] * d)
        for blk in self.temporal:
            x, _ = blk(x, (t,), prefix=1, ledger=ledger)
        if ledger is not None:
            ledger.linear(self.head, 1, "head")
        return self.head(self.head_drop(self.temporal_norm(x[:, 0])))

    def stack_steps(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips (B, 3, T, H, W) to spatial-model inputs (B * T // tubelet, 3 * tubelet, H, W),
        channels of one time step ordered (colour, frame)."""
        b, c, t, h, w = clips.shape
        steps = t // self.tubelet
        x = clips[:, :, : steps * self.tubelet].reshape(b, c, steps, self.tubelet, h, w)
        return x.permute(0, 2, 1, 3, 4, 5).reshape(b * steps, c * self.tubelet, h, w)

    def forward(self, clips: torch.Tensor, ledger: Ledger | None = None) -> torch.Tensor:
        """Dense logits for clips (B, 3, T, H, W): spatial model per step, then temporal."""
        b = clips.shape[0]
        frames = self.stack_steps(clips)
        t = frames.shape[0] // b
        sub = Ledger(b * t) if ledger is not None else None
        e = self.backbone.embed(frames, sub)
        tokens, _ = self.backbone.forward_blocks(e.tokens, e.grid, sub)
        if ledger is not None:  # fold per-frame counts back into per-clip counts
            for k, v in sub.macs.items():
                ledger.macs[k] += v.view(b, t).sum(1)
            ledger.tokens += sub.tokens.view(b, t).sum(1)
        emb = self.frame_embedding(tokens).view(b, t, -1)
        return self.forward_temporal(emb, ledger)
