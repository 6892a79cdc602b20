"""Converters from foreign checkpoint layouts to vidprune's key names.

Each converter recognises its format from key names and returns a state dict for a model
built by :func:`models.registry.build_arch`. ``convert_for`` tries them in order; a state dict
already in vidprune's own layout passes through unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Converter = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]

#: (name, detector, converter): detector(state) tells whether the state is in that format.
CONVERTERS: list[tuple[str, Callable[[dict[str, torch.Tensor]], bool], Converter]] = []


def register(name: str, detect: Callable[[dict[str, torch.Tensor]], bool]):
    def wrap(fn: Converter) -> Converter:
        CONVERTERS.append((name, detect, fn))
        return fn
    return wrap


def detect_format(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = set(model.state_dict())
    if set(state) <= own or own <= set(state):
        return "native"
    for name, detect, _ in CONVERTERS:
        if detect(state):
            return name
    return "native"  # unknown: loading will list the keys that do not fit


def convert_for(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fmt = detect_format(model, state)
    for name, _detect, fn in CONVERTERS:
        if name == fmt:
            return fn(model, state)
    return state
