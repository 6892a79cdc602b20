"""What every pruning method provides, and the per-stream state it keeps.

A method runs a backbone's blocks its own way. The runner (``models/runner.py``) embeds the
input, hands the method the tokens and the method's state for the streams being stepped, and
takes back final tokens of the same shape (a dense map: pruned positions are filled from the
method's buffers), which the model's head turns into predictions.

A method is selected by name with its parameters (``build_method("eventful", r=512)``); its
parameters are a dataclass (``Params``) so the job spec can validate them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..heads import Detections
from ..ledger import Ledger
from ..vit import Embedded, ViT


class MethodError(ValueError):
    """A method cannot run with these parameters or on this model."""


@dataclass
class StepContext:
    """What the runner knows about the frames of one step.

    ``valid`` (B, N) marks the grid tokens that cover real pixels (False on the padding added
    to make the input square); ``first`` is True at the first frame of the streams (streams of
    one state start together, so it holds for all of them).
    """

    valid: torch.Tensor | None
    first: bool
    input_size: tuple[int, int]


class MethodState:
    """Everything one method carries from frame to frame, for a batch of streams.

    Tensors have the stream as their leading dimension; slot ``i`` belongs to stream ``i`` of
    the batch and nothing is shared between slots. ``select`` keeps a subset of the streams
    (when some streams of a batch end before others).
    """

    def select(self, index: torch.Tensor) -> "MethodState":
        return _select_tensors(self, index)


def _select_tensors(obj: Any, index: torch.Tensor) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.ndim else obj
    if isinstance(obj, list):
        return [_select_tensors(x, index) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_select_tensors(x, index) for x in obj)
    if isinstance(obj, dict):
        return {k: _select_tensors(v, index) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{
            f.name: _select_tensors(getattr(obj, f.name), index)
            for f in dataclasses.fields(obj) if f.init})
    return obj


@dataclass
class NoState(MethodState):
    """State of a method that carries nothing across frames."""


class Method:
    """Base class. Subclasses set ``name``, ``kinds`` (``frame`` and/or ``clip`` models they
    run on), ``Params`` (a dataclass) and implement :meth:`forward`."""

    name: ClassVar[str] = ""
    kinds: ClassVar[frozenset[str]] = frozenset({"frame"})
    #: True when the method reads the previous frame's predictions (rollout)
    uses_predictions: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, params: Any = None, **kwargs: Any):
        if params is None:
            try:
                params = self.Params(**kwargs)
            except TypeError as exc:
                raise MethodError(f"{self.name}: {exc}") from None
        elif kwargs:
            raise TypeError("pass either a Params object or keyword parameters, not both")
        self.params = params

    def describe(self) -> dict[str, Any]:
        """The parameters as plain values (recorded with every output row)."""
        return dataclasses.asdict(self.params)

    def check(self, model: torch.nn.Module, input_size: int | None = None) -> None:
        """Raise :class:`MethodError` if this method cannot run on ``model`` at the square
        input size ``input_size`` (default: the model's own)."""
        if model.kind not in self.kinds:
            raise MethodError(
                f"method {self.name!r} runs on {'/'.join(sorted(self.kinds))} models; "
                f"{type(model).__name__} is a {model.kind} model")

    def new_state(self, backbone: ViT, batch: int) -> MethodState:
        return NoState()

    def forward(self, backbone: ViT, emb: Embedded, state: MethodState, ledger: Ledger,
                ctx: StepContext) -> torch.Tensor:
        """Run the blocks on ``emb.tokens`` (B, P+N, D); return final tokens, same shape."""
        raise NotImplementedError

    def observe(self, state: MethodState, detections: list[Detections],
                ctx: StepContext) -> None:
        """Called after the head with this frame's predictions (input pixels), per stream."""


class Dense(Method):
    """No pruning: the reference every method is measured against."""

    name = "none"
    kinds = frozenset({"frame", "clip"})

    def forward(self, backbone: ViT, emb: Embedded, state: MethodState, ledger: Ledger,
                ctx: StepContext) -> torch.Tensor:
        tokens, _ = backbone.forward_blocks(emb.tokens, emb.grid, ledger)
        return tokens
