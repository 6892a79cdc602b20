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
                     score_threshold: float = 0.05,
                     image_sizes: list[tuple[int, int]] | None = None) -> list[Detections]:
        """Final backbone tokens (B, N, D) to detections in input pixels. ``image_sizes``:
        the (h, w) of each image before square padding (a two-stage head clips boxes to it,
        as detectron2 does); default: the whole input."""
        b, n, d = tokens.shape
        fmap = self.backbone.norm(tokens).transpose(1, 2).reshape(b, d, *grid)
        features = self.neck(fmap, ledger)
        if isinstance(self.head, CenterNetHead):
            return self.head.decode(self.head(features, ledger), score_threshold)
        if image_sizes is None:
            patch = self.backbone.patch
            image_sizes = tuple(images.shape[-2:]) if images is not None else \
                (grid[0] * patch, grid[1] * patch)
        return self.head(features, image_sizes, ledger=ledger, score_threshold=score_threshold)

    def forward(self, images: torch.Tensor, ledger: Ledger | None = None,
                score_threshold: float = 0.05) -> list[Detections]:
        """Dense detection of a batch of preprocessed images (B, 3, H, W)."""
        e = self.backbone.embed(images, ledger)
        tokens, _ = self.backbone.forward_blocks(e.tokens, e.grid, ledger)
        return self.forward_head(tokens, e.grid, ledger, images, score_threshold)
