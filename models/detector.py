"""The ViTDet-style detector: a ViT backbone in the ViTDet layout, the simple feature pyramid
and a detection head."""

from __future__ import annotations

import torch
from torch import nn

from .heads import CenterNetHead, Detections, SimpleFeaturePyramid
from .ledger import Ledger
from .vit import ViT


class ViTDetector(nn.Module):
    """Backbone + neck + head. ``forward_head`` takes the backbone's final tokens, so that a
    pruning method can run the backbone its own way and hand the (dense) map to the head."""

    task = "detection"
    kind = "frame"

    def __init__(self, backbone: ViT, neck: SimpleFeaturePyramid, head: nn.Module,
                 class_names: list[str]):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.class_names = list(class_names)

    def forward_head(self, tokens: torch.Tensor, grid: tuple[int, int],
                     ledger: Ledger | None = None, images: torch.Tensor | None = None,
                     score_threshold: float = 0.05) -> list[Detections]:
        """Final backbone tokens (B, N, D) to detections in input pixels."""
        b, n, d = tokens.shape
        fmap = self.backbone.norm(tokens).transpose(1, 2).reshape(b, d, *grid)
        features = self.neck(fmap, ledger)
        if isinstance(self.head, CenterNetHead):
            return self.head.decode(self.head(features, ledger), score_threshold)
        image_size = tuple(images.shape[-2:]) if images is not None else (grid[0] * 16, grid[1] * 16)
        return self.head(features, image_size, ledger=ledger, score_threshold=score_threshold)

    def forward(self, images: torch.Tensor, ledger: Ledger | None = None,
                score_threshold: float = 0.05) -> list[Detections]:
        """Dense detection of a batch of preprocessed images (B, 3, H, W)."""
        e = self.backbone.embed(images, ledger)
        tokens, _ = self.backbone.forward_blocks(e.tokens, e.grid, ledger)
        return self.forward_head(tokens, e.grid, ledger, images, score_threshold)
