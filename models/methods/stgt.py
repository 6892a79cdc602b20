"""STGT baseline (Eventful Transformers' Table C): gates comparing tokens with the last frame.

The Eventful Transformers paper compares against a simple form of Spatio-Temporal Gated
Transformers: the same gate/buffer pairs on the token-wise ops, but a gate's reference becomes
the current frame for every token each frame, so slow drifts never accumulate into an update.
Attention runs densely on the buffered qkv, so the compute equals the "Token-wise only"
variant's at the same ``r`` (Table C lists identical GFLOPs for both).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .eventful import Eventful
from .gates import GateParams, PreviousFrameGate


@register
class STGT(Eventful):
    name = "stgt"

    @dataclass
    class Params(GateParams):
        pass

    gate_class = PreviousFrameGate

    def sparse_attention(self) -> bool:
        return False
