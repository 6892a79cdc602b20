"""vidprune's models: pure PyTorch, usable on its own::

    from models import build_model, build_method, StreamRunner
    model = build_model("vitdet-ti", input_size=448)      # an architecture or a zoo name
    runner = StreamRunner(model, build_method("none"))
    state = runner.new_state(2)
    outs = runner.step([frame_a, frame_b], state)        # RGB uint8 (H, W, 3) arrays

Knows nothing of Ray, object stores or Parquet.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .heads import Detections
from .ledger import Ledger
from .methods import METHODS, Method, MethodError, build_method
from .registry import ARCHS, ModelError, build_arch, build_zoo_model, zoo_entries
from .runner import ClipResult, StepOutput, StreamRunner


def build_model(name: str | None = None, *, arch: str | None = None,
                checkpoint: Any = None, **options: Any) -> nn.Module:
    """A model by zoo name, or an architecture (randomly initialised unless ``checkpoint``,
    a path or open file, is given). ``options`` go to :func:`build_arch`."""
    if name is not None and arch is None:
        if name in zoo_entries():
            if options or checkpoint is not None:
                raise ModelError(f"zoo model {name!r} takes no options or checkpoint")
            return build_zoo_model(name)
        if name in ARCHS:
            arch = name
        else:
            zoo = ", ".join(sorted(zoo_entries())) or "(none shipped)"
            raise ModelError(f"unknown model {name!r}; zoo models: {zoo}; architectures: "
                             f"{', '.join(sorted(ARCHS))}")
    if arch is None:
        raise ModelError("name a zoo model, or an architecture (with a checkpoint)")
    model = build_arch(arch, **options)
    if checkpoint is not None:
        from .checkpoints import load_into

        load_into(model, checkpoint)
    return model.eval()


__all__ = ["ARCHS", "METHODS", "ClipResult", "Detections", "Ledger", "Method", "MethodError",
           "ModelError", "StepOutput", "StreamRunner", "build_arch", "build_method",
           "build_model", "zoo_entries"]
