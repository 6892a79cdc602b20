"""An image classifier ViT (timm / DeiT layout): class token, final norm, linear head."""

from __future__ import annotations

import torch
from torch import nn

from .ledger import Ledger
from .vit import ViT


class ViTClassifier(nn.Module):
    task = "classification"
    kind = "frame"

    def __init__(self, backbone: ViT, num_classes: int, class_names: list[str]):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.dim, num_classes)
        self.class_names = list(class_names)

    def forward_head(self, tokens: torch.Tensor, ledger: Ledger | None = None) -> torch.Tensor:
        if ledger is not None:
            ledger.linear(self.head, 1, "head")
        return self.head(self.backbone.norm(tokens)[:, 0])

    def forward(self, images: torch.Tensor, ledger: Ledger | None = None) -> torch.Tensor:
        e = self.backbone.embed(images, ledger)
        tokens, _ = self.backbone.forward_blocks(e.tokens, e.grid, ledger)
        return self.forward_head(tokens, ledger)
