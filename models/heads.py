"""Necks and heads: ViTDet's simple feature pyramid, a one-stage detection head, and the
recognition heads. Head work is counted in the ledger's ``head`` category, outside the
backbone figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_macs
from .ledger import Ledger


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (detectron2's ``LayerNorm``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Conv2dNorm(nn.Conv2d):
    """A convolution followed by an optional norm, under detectron2's key names
    (``weight``, ``bias``, ``norm.weight``, ``norm.bias``)."""

    def __init__(self, *args, norm: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


def counted(module: nn.Module, x: torch.Tensor, ledger: Ledger | None,
            category: str = "head") -> torch.Tensor:
    """Run ``module`` and count the MACs of every convolution inside it."""
    if ledger is None:
        return module(x)
    handles = []

    def hook(mod, inp, out):
        ledger.add(conv_macs(mod, out, inp[0]), category)

    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            handles.append(m.register_forward_hook(hook))
    try:
        return module(x)
    finally:
        for h in handles:
            h.remove()


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from the single stride-16 map, with detectron2's
    names (``simfp_2`` .. ``simfp_5`` for strides 4 .. 32)."""

    def __init__(self, in_dim: int, out_channels: int = 256,
                 scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.scales = scales
        self.strides = [int(16 / s) for s in scales]
        for scale, stride in zip(scales, self.strides):
            dim = in_dim
            if scale == 4.0:
                layers = [nn.ConvTranspose2d(in_dim, in_dim // 2, 2, 2), LayerNorm2d(in_dim // 2),
                          nn.GELU(), nn.ConvTranspose2d(in_dim // 2, in_dim // 4, 2, 2)]
                dim = in_dim // 4
            elif scale == 2.0:
                layers = [nn.ConvTranspose2d(in_dim, in_dim // 2, 2, 2)]
                dim = in_dim // 2
            elif scale == 1.0:
                layers = []
            elif scale == 0.5:
                layers = [nn.MaxPool2d(2, 2)]
            else:
                raise ValueError(f"unsupported pyramid scale {scale}")
            layers += [
                Conv2dNorm(dim, out_channels, 1, bias=False, norm=LayerNorm2d(out_channels)),
                Conv2dNorm(out_channels, out_channels, 3, padding=1, bias=False,
                           norm=LayerNorm2d(out_channels)),
            ]
            self.add_module(f"simfp_{int(math.log2(stride))}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor, ledger: Ledger | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for stride in self.strides:
            level = int(math.log2(stride))
            out[f"p{level}"] = counted(getattr(self, f"simfp_{level}"), x, ledger)
        return out


@dataclass
class Detections:
    """Detections of one frame, boxes as (x0, y0, x1, y1) pixels."""

    boxes: torch.Tensor   # (n, 4) float
    scores: torch.Tensor  # (n,)
    labels: torch.Tensor  # (n,) long

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: str | torch.device) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))


class CenterNetHead(nn.Module):
    """A one-stage, anchor-free head on one pyramid level (CenterNet: class heatmaps, box
    size and centre offset). Small and quick to train, used by the zoo detectors."""

    def __init__(self, in_channels: int, num_classes: int, level: str = "p3",
                 hidden: int = 128, max_detections: int = 100):
        super().__init__()
        self.level = level
        self.stride = 2 ** int(level[1:])
        self.num_classes = num_classes
        self.max_detections = max_detections

        def branch(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, out, 1))

        self.heatmap = branch(num_classes)
        self.size = branch(2)
        self.offset = branch(2)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # prior 0.1, as CenterNet

    def forward(self, features: dict[str, torch.Tensor], ledger: Ledger | None = None
                ) -> dict[str, torch.Tensor]:
        x = features[self.level]
        return {"heatmap": counted(self.heatmap, x, ledger),
                "size": counted(self.size, x, ledger),
                "offset": counted(self.offset, x, ledger)}

    @torch.no_grad()
    def decode(self, raw: dict[str, torch.Tensor], score_threshold: float = 0.05
               ) -> list[Detections]:
        """Peaks of the class heatmaps (3x3 max-pool suppression) to boxes in input pixels, on
        the CPU (the whole batch's top peaks leave the device in one transfer; splitting them
        per image on the device would cost a synchronisation per image).

        A peak whose regressed width or height is not positive is not a box (it covers no
        pixel and can match nothing) and is dropped, whatever its score."""
        heat = raw["heatmap"].float().sigmoid()
        b, c, h, w = heat.shape
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        k = min(self.max_detections, c * h * w)
        scores, idx = peaks.reshape(b, -1).topk(k)
        pix = idx % (h * w)
        at = pix[:, None].expand(b, 2, k)
        size = raw["size"].float().reshape(b, 2, -1).gather(2, at)    # (b, 2, k) w, h
        off = raw["offset"].float().reshape(b, 2, -1).gather(2, at)   # (b, 2, k) x, y
        centre = torch.stack([pix % w, pix // w], 1).float() + off
        half = size * (self.stride / 2)
        boxes = torch.cat([centre * self.stride - half, centre * self.stride + half], 1)
        keep = (scores >= score_threshold) & (size > 0).all(1)
        packed = torch.cat([boxes.transpose(1, 2), scores[..., None], (idx // (h * w))[..., None],
                            keep[..., None]], 2).cpu()                # (b, k, 7)
        kept = packed[:, :, 6].bool()
        rows = packed[kept]                                           # (kept, 7), image order
        counts = kept.sum(1).tolist()
        return [Detections(*parts) for parts in zip(rows[:, :4].split(counts),
                                                    rows[:, 4].split(counts),
                                                    rows[:, 5].long().split(counts))]


class LinearHead(nn.Module):
    """Classifier on pooled features; ``fc_norm`` (VideoMAE) or none before it."""

    def __init__(self, dim: int, num_classes: int, fc_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if fc_norm else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, pooled: torch.Tensor, ledger: Ledger | None = None) -> torch.Tensor:
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        if ledger is not None:
            ledger.linear(self.head, 1, "head")
        return self.head(self.dropout(pooled))
