"""Token gates, token buffers and selection policies (Eventful Transformers, ICCV 2023).

A *gate* keeps a reference ``p`` of the tokens it last let through; each frame it measures
the error ``e = c - p`` per token, asks its *policy* which tokens to update from ``||e||_2``,
hands those rows on and sets ``p`` to the current value for them only (the others keep
accumulating error). A *buffer* holds the dense output of the op after a gate and takes the
updated rows in. Both are small dataclasses of tensors with the stream as leading dimension,
so a method state built from them can be ``select``-ed and ``reset``.

Batching streams: ``top_r`` and ``top_fraction`` pick the same number of tokens for every
stream, so shapes are static. ``threshold`` is ragged: each stream has its own count. We pad
every stream to the largest count of the batch and carry a mask. Padding rows are real
(unselected) tokens, so every op runs on one dense (B, K, ...) batch -- one kernel per op on a
GPU, where grouping by count would degenerate into a loop over streams and nested tensors do
not support the gather/scatter/batched-matmul mix the sparse attention update needs. A padding
row's result is never written back, so a stream's output does not depend on which streams
share its batch; the padding rows' work goes to the ledger's ``padding`` category, each
stream's own rows to its own count.

Counting (docs/ARCHITECTURE.md, counting convention): a gate's error costs ``T x W``
subtractions plus ``T x W`` multiply-accumulates for the squared norm, and every row written
into a reference or a buffer on an incremental frame counts one op per element; both go to
``overhead``. State is filled on a stream's first frame from the dense outputs (copied, on the
CPU at inference, into memory that ended states gave back: see :func:`state_empty`; copies are
not arithmetic).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch

from ..layers import scratch
from ..ledger import Ledger
from .base import MethodError

Count = int | torch.Tensor  # per-stream count: one int for all streams, or a (B,) tensor


# --- spare state memory ---------------------------------------------------------------------

_spare = threading.local()


def _poolable(device: torch.device) -> bool:
    """State memory is recycled on the CPU at inference only: there a fresh tensor of a few
    megabytes or more is a new mapping whose pages fault in on first touch (measured: filling
    the 1.2 GB of a first frame's attention state took 0.26-2.1 s fresh, 0.09 s reused). A
    GPU's caching allocator recycles by itself; training must not share storage."""
    return device.type == "cpu" and not torch.is_grad_enabled()


def state_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                ) -> torch.Tensor:
    """An uninitialised tensor for a method state: a spare one that an ended state gave back
    (:func:`give_back`) when one of this exact shape is there, else a new one. The caller
    must write every element before reading any."""
    device = torch.device(device)
    if not _poolable(device):
        return torch.empty(shape, dtype=dtype, device=device)
    key = (tuple(shape), dtype, device, torch.is_inference_mode_enabled())
    free = _spare.__dict__.setdefault("free", {}).get(key)
    if free:
        return free.pop()
    t = torch.empty(shape, dtype=dtype, device=device)
    t._state_memory = True  # give_back takes only these: nobody else can hold a view of them
    return t


def state_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` to be kept in a state: copied into :func:`state_empty` memory where memory is
    recycled (so the caller's ``x`` goes back to the allocator for the next op), else ``x``
    itself (owned from now on)."""
    if not _poolable(x.device):
        return x
    return state_empty(tuple(x.shape), x.dtype, x.device).copy_(x)


def give_back(tensors: Iterable[torch.Tensor | None]) -> None:
    """Hand the tensors of a state that nobody uses any more to :func:`state_empty` (only
    those it made; other tensors are left to the allocator). Spare tensors that differ from
    a given one in their leading (stream) dimension only are freed: a batch of streams that
    shrinks does not keep the larger batch's memory."""
    given = [t for t in tensors if t is not None and getattr(t, "_state_memory", False)]
    free = _spare.__dict__.setdefault("free", {})
    keys = [(tuple(t.shape), t.dtype, t.device, t.is_inference()) for t in given]
    other_batch = {(s[1:], *rest) for s, *rest in keys}
    for stale in [k for k in free if k not in keys and (k[0][1:], *k[1:]) in other_batch]:
        del free[stale]
    for key, t in zip(keys, given):
        free.setdefault(key, []).append(t)


def release_spare_state() -> None:
    """Free the spare state tensors of this thread (memory measurements)."""
    _spare.__dict__.pop("free", None)


# --- selections --------------------------------------------------------------------------

@dataclass
class Selection:
    """Which tokens each stream updates: ``index`` (B, K) token positions; ``mask`` (B, K)
    marks real selections when streams selected different counts (None: all real).

    Rows (tokens along dimension 1 of (B, T, W), or 2 of (B, h, T, X)) are read and written
    through one flat index over the leading dimensions (``index_select``/``index_copy_``,
    batched over streams and much cheaper than ``gather``/``scatter`` with an expanded
    index); columns (the last dimension of (B, h, T, T)) through ``gather``/``scatter``.
    """

    index: torch.Tensor
    mask: torch.Tensor | None = None
    # (B, lead, T) -> flat row positions: a frame reads and writes the same rows of several
    # tensors of one layout, and each position tensor took four operator calls to build
    _flat: dict[tuple[int, int, int], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    # (selected, padding) per stream of a ragged selection: every layer run on it counts them
    _ragged_counts: tuple[torch.Tensor, torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False)

    @property
    def width(self) -> int:
        return self.index.shape[1]

    @property
    def count(self) -> Count:
        """Selected tokens per stream."""
        if self.mask is None:
            return self.width
        return self._counts()[0]

    @property
    def padding(self) -> Count:
        """Padding rows per stream (executed, not selected)."""
        if self.mask is None:
            return 0
        return self._counts()[1]

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ragged_counts is None:
            count = self.mask.sum(1)
            self._ragged_counts = (count, self.width - count)
        return self._ragged_counts

    # -- rows ---------------------------------------------------------------------------------
    def _flat_rows(self, shape: torch.Size) -> torch.Tensor:
        """(B, lead, K) positions of the selected rows in ``x.view(-1, shape[-1])`` for
        ``x`` of ``shape`` (B, *lead, T, X)."""
        b, t = shape[0], shape[-2]
        lead = math.prod(shape[1:-2])
        flat = self._flat.get((b, lead, t))
        if flat is None:
            base = torch.arange(b * lead, device=self.index.device).view(b, lead, 1) * t
            flat = self._flat[b, lead, t] = base + self.index[:, None, :]
        return flat

    def rows(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The selected rows of ``x`` (B, [h,] T, X) -> (B, [h,] K, X), padding rows
        included; into ``out`` (contiguous, of that shape) if given."""
        flat = self._flat_rows(x.shape).reshape(-1)
        source = x.reshape(-1, x.shape[-1])
        if out is None:
            out = source.index_select(0, flat)
        else:
            torch.index_select(source, 0, flat, out=out.view(-1, x.shape[-1]))
        return out.view(*x.shape[:-2], self.width, x.shape[-1])

    def write_rows(self, target: torch.Tensor, rows: torch.Tensor) -> None:
        """Write ``rows`` (B, [h,] K, X) into the contiguous ``target`` (B, [h,] T, X) in
        place; padding rows are not written."""
        flat = self._flat_rows(target.shape)
        rows = rows.reshape(*flat.shape, target.shape[-1])
        if self.mask is not None:
            keep = self.mask[:, None, :].expand(flat.shape)
            flat, rows = flat[keep], rows[keep]
        target.view(-1, target.shape[-1]).index_copy_(
            0, flat.reshape(-1), rows.reshape(-1, target.shape[-1]).to(target.dtype))

    # -- columns ------------------------------------------------------------------------------
    def column_index(self, shape: torch.Size, of: torch.Tensor) -> torch.Tensor:
        """``of`` (B, K), one value per selected token, expanded to index the last dimension
        of a tensor of ``shape`` (B, ..., X) with ``gather``/``scatter``."""
        view = [shape[0]] + [1] * (len(shape) - 2) + [self.width]
        return of.view(view).expand(*shape[:-1], self.width)

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """The selected columns (last dimension) of ``x``."""
        return x.gather(-1, self.column_index(x.shape, self.index))

    def write_columns(self, target: torch.Tensor, cols: torch.Tensor) -> None:
        """Write ``cols`` into the selected columns of ``target`` in place; padding columns
        write the target's own old values back, so they change nothing."""
        index = self.column_index(target.shape, self.index)
        if self.mask is not None:
            cols = torch.where(self.column_index(target.shape, self.mask), cols,
                               target.gather(-1, index))
        target.scatter_(-1, index, cols.to(target.dtype))

    def zero_padding_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, [h,] K, X) with its padding rows set to zero."""
        if self.mask is None:
            return x
        view = [x.shape[0]] + [1] * (x.ndim - 3) + [self.width, 1]
        return x * self.mask.view(view).to(x.dtype)

    def zero_padding_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its padding columns (last dimension) set to zero."""
        if self.mask is None:
            return x
        return x * self.column_index(x.shape, self.mask).to(x.dtype)


def count_rows(ledger: Ledger, sel: Selection, per_row: int, category: str) -> None:
    """``per_row`` ops for each selected row (to ``category``) and each padding row."""
    ledger.add(sel.count, category, per_row)
    if sel.mask is not None:
        ledger.add(sel.padding, "padding", per_row)


def count_linear(ledger: Ledger, layer: torch.nn.Linear, sel: Selection) -> None:
    """A Linear layer run on the selected rows (and the padding rows)."""
    ledger.linear(layer, sel.count)
    if sel.mask is not None:
        ledger.linear(layer, sel.padding, "padding")


# --- policies ----------------------------------------------------------------------------

class Policy(Protocol):
    def __call__(self, norms: torch.Tensor) -> Selection:
        """Tokens to update from per-token error norms (B, T)."""


@dataclass(frozen=True)
class TopR:
    """The ``r`` tokens with the largest error (all tokens when r >= T). Static shapes."""

    r: int

    def __call__(self, norms: torch.Tensor) -> Selection:
        k = min(self.r, norms.shape[1])
        return Selection(_ascending(norms.topk(k, dim=1, sorted=False).indices))


@dataclass(frozen=True)
class TopFraction:
    """The ``int(fraction x T)`` tokens with the largest error. Static shapes."""

    fraction: float

    def __call__(self, norms: torch.Tensor) -> Selection:
        return TopR(int(self.fraction * norms.shape[1]))(norms)


@dataclass(frozen=True)
class Threshold:
    """Every token with ``||e|| > threshold``; ragged across streams (padded with a mask)."""

    threshold: float

    def __call__(self, norms: torch.Tensor) -> Selection:
        chosen = norms > self.threshold
        k = int(chosen.sum(1).max())
        # chosen tokens sort first (norms >= 0 > -1); the rest of each row is padding
        key = torch.where(chosen, norms, torch.full_like(norms, -1.0))
        index = _ascending(key.topk(k, dim=1, sorted=False).indices)
        mask = chosen.gather(1, index)
        return Selection(index, None if bool(mask.all()) else mask)


def _ascending(index: torch.Tensor) -> torch.Tensor:
    """Token positions in ascending order: the same set, but row and column reads and writes
    then walk memory forwards (measured 1.6x faster column scatter and gather on CPU)."""
    return index.sort(dim=1).values


POLICIES = ("top_r", "threshold", "top_fraction")


@dataclass
class GateParams:
    """The gating parameters shared by the gated methods (validated on construction)."""

    policy: str = "top_r"   # top_r | threshold | top_fraction
    r: int = 1024           # top_r: tokens per gate (all tokens when r >= P + N)
    threshold: float = 1.0  # threshold: update the tokens with ||e||_2 above it
    fraction: float = 0.25  # top_fraction: share of the P + N tokens per gate
    prefix: str = "gated"   # gated: prefix tokens like any other (authors) | always

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise MethodError(f"unknown policy {self.policy!r}; expected one of "
                              f"{', '.join(POLICIES)}")
        r = self.r
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise MethodError(f"r must be a positive number of tokens, got {r!r}")
        if not self.threshold >= 0:
            raise MethodError(f"threshold must be >= 0, got {self.threshold!r}")
        if not 0 < self.fraction <= 1:
            raise MethodError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.prefix not in ("gated", "always"):
            raise MethodError(f"prefix must be 'gated' or 'always', got {self.prefix!r}")

    def make_policy(self) -> Policy:
        """A fresh policy object (one per gate)."""
        if self.policy == "top_r":
            return TopR(self.r)
        if self.policy == "threshold":
            return Threshold(self.threshold)
        return TopFraction(self.fraction)


# --- gates and buffers ---------------------------------------------------------------------

@dataclass
class Gate:
    """A token gate (Eventful Transformers): the reference is updated only for the selected tokens.

    ``always``: the first ``always`` tokens (prefix tokens) are selected on every frame.
    """

    policy: Policy
    always: int = 0
    ref: torch.Tensor | None = None  # (B, T, W)

    def reset(self) -> None:
        self.ref = None

    def flush(self, c: torch.Tensor) -> None:
        """First frame: every token passes; ``c`` becomes the reference (see
        :func:`state_copy`)."""
        self.ref = state_copy(c)

    def __call__(self, c: torch.Tensor, ledger: Ledger) -> tuple[Selection, torch.Tensor]:
        """Select tokens of ``c`` (B, T, W); returns the selection and their rows of ``c``."""
        sel = self._select(c, ledger)
        rows = sel.rows(c)
        self._update_reference(c, sel, rows, ledger)
        return sel, rows

    def _select(self, c: torch.Tensor, ledger: Ledger) -> Selection:
        t, w = c.shape[1], c.shape[2]
        error = torch.sub(c, self.ref, out=scratch("gate.error", c.shape, c.dtype, c.device)) \
            if not torch.is_grad_enabled() else c - self.ref
        norms = torch.linalg.vector_norm(error, dim=-1)
        ledger.add(2 * t * w, "overhead")  # the subtraction, and the squares summed
        if self.always:
            norms[:, : self.always] = float("inf")
        return self.policy(norms)

    def _update_reference(self, c, sel: Selection, rows: torch.Tensor, ledger: Ledger) -> None:
        sel.write_rows(self.ref, rows)
        count_rows(ledger, sel, c.shape[2], "overhead")


@dataclass
class PreviousFrameGate(Gate):
    """The STGT baseline's gate: compares with the previous frame, so the reference becomes
    the current input for every token (errors never accumulate)."""

    def _update_reference(self, c, sel: Selection, rows: torch.Tensor, ledger: Ledger) -> None:
        self.ref = c  # swapping the reference executes no arithmetic


@dataclass
class Buffer:
    """The dense output (B, T, W) of the op after a gate; updated rows are scattered in.

    The tensor never leaves the method: :meth:`add_to` returns a new sum, and :meth:`peek`
    lends it, within one frame, to ops that only read it and return new tensors (attention
    on the buffered qkv). Anything that would change it in place must copy it first.
    """

    value: torch.Tensor | None = None

    def reset(self) -> None:
        self.value = None

    def fill(self, y: torch.Tensor) -> None:
        """First frame: the dense output ``y`` becomes the buffer (see :func:`state_copy`)."""
        self.value = state_copy(y)

    def update(self, sel: Selection, rows: torch.Tensor, ledger: Ledger) -> None:
        sel.write_rows(self.value, rows)
        count_rows(ledger, sel, self.value.shape[2], "overhead")

    def rows(self, sel: Selection) -> torch.Tensor:
        """A copy of the selected rows (B, K, W)."""
        return sel.rows(self.value)

    def peek(self) -> torch.Tensor:
        return self.value

    def add_to(self, x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """``x`` plus the buffer; ``in_place`` (at inference, when ``x`` is the caller's own
        intermediate) adds into ``x`` instead of allocating a new tensor."""
        if in_place and not torch.is_grad_enabled():
            return x.add_(self.value)
        return x + self.value
