"""The compute ledger: multiply-accumulates actually executed, per stream, per step.

Convention (the papers' own, docs/ARCHITECTURE.md): one multiply-accumulate (MAC)
counts as one operation and is called a "FLOP" in the papers' tables. Counted in the backbone
figure: Linear layers (tokens x in x out, plus the bias additions), matrix products
(out.numel() x K), einsums (relative position terms), additions of residuals and biases, and
each pruning method's own overhead (gate error norms, rollout products, similarity products).
Not counted there: LayerNorm, softmax, GELU, the patch-embedding convolution. The patch
embedding and the task head are counted in their own categories so full-model figures can be
reported beside the backbone figure.

Every counting call names what it counts per stream: an ``int`` when all streams of the batch
did the same work, or a length-B tensor when the work was ragged (a threshold policy, learned
gates). The ledger never predicts work: the layers that do the work report it, so fewer MACs
appear only when fewer MACs ran.
"""

from __future__ import annotations

import torch

#: Categories that make up a method's executed backbone figure ("gmacs_run").
BACKBONE_CATEGORIES = ("backbone", "overhead")
CATEGORIES = ("backbone", "overhead", "patch_embed", "head", "padding")


class Ledger:
    """MACs and processed tokens of one step of ``batch`` streams, kept per stream.

    ``backbone``: transformer-block work; ``overhead``: the pruning method's own bookkeeping
    (counted in the headline figure, shown separately); ``patch_embed`` and ``head``: outside
    the headline figure; ``padding``: work executed only on padding rows when ragged streams
    are batched together (executed, so reported, but not attributed to any stream's method).
    ``tokens``: per stream, the number of tokens that went through each block's MLP, summed
    over blocks (a dense model processes ``depth x N``).

    A frame makes a few hundred counting calls, most of them one number for every stream.
    Those are summed as Python floats and folded into the per-stream tensors when ``macs`` or
    ``tokens`` is read: two tensor operations per call were a fifth of a dense step's
    operator calls (host time that a GPU waits on). Per-stream tensors (the ragged policies)
    are summed on their own device and moved to the host when read, once per step: moving
    each one at once would wait for the GPU at every counting call. The sums are the same:
    every count is a whole number far below 2**53, so float64 adds them exactly in any order.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._macs = {name: _zeros(batch) for name in CATEGORIES}
        self._tokens = _zeros(batch)
        self._uniform = dict.fromkeys(CATEGORIES, 0.0)  # per stream, not yet in ``_macs``
        self._uniform_tokens = 0.0
        self._ragged: dict[str, torch.Tensor] = {}  # per stream, on the counts' device
        self._ragged_tokens: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"Ledger(batch={self.batch}, run={self.run_macs().tolist()})"

    @property
    def macs(self) -> dict[str, torch.Tensor]:
        """Category -> (batch,) float64 MACs per stream (the tensors themselves: callers may
        add into them in place)."""
        for name, value in self._uniform.items():
            if value:
                self._macs[name] += value
                self._uniform[name] = 0.0
        for name, value in self._ragged.items():
            self._macs[name] += value.to("cpu")
        self._ragged.clear()
        return self._macs

    @property
    def tokens(self) -> torch.Tensor:
        """(batch,) float64: tokens through each block's MLP, per stream, summed over blocks."""
        if self._uniform_tokens:
            self._tokens += self._uniform_tokens
            self._uniform_tokens = 0.0
        if self._ragged_tokens is not None:
            self._tokens += self._ragged_tokens.to("cpu")
            self._ragged_tokens = None
        return self._tokens

    @tokens.setter
    def tokens(self, value: torch.Tensor) -> None:  # ``ledger.tokens += ...`` reads, then sets
        self._tokens, self._uniform_tokens, self._ragged_tokens = value, 0.0, None

    # -- recording ---------------------------------------------------------------------------
    def add(self, macs: int | float | torch.Tensor, category: str = "backbone") -> None:
        """Record ``macs`` per stream (a number applies to every stream of the batch)."""
        if category not in self._uniform:
            raise KeyError(f"unknown ledger category {category!r}; expected one of {CATEGORIES}")
        if isinstance(macs, torch.Tensor):
            self._ragged[category] = _accumulate(self._ragged.get(category), macs, self.batch)
        else:
            self._uniform[category] += float(macs)

    def linear(self, layer: torch.nn.Linear, tokens: int | torch.Tensor,
               category: str = "backbone") -> None:
        """A Linear layer applied to ``tokens`` rows per stream (bias additions included)."""
        per_token = layer.in_features * layer.out_features
        if layer.bias is not None:
            per_token += layer.out_features
        self.add(_scale(tokens, per_token), category)

    def matmul(self, out_elements: int | torch.Tensor, inner: int,
               category: str = "backbone") -> None:
        """A matrix product with ``out_elements`` outputs per stream and inner size ``inner``."""
        self.add(_scale(out_elements, inner), category)

    def adds(self, elements: int | torch.Tensor, category: str = "backbone") -> None:
        """Elementwise additions (residuals, biases, position terms)."""
        self.add(elements, category)

    def processed(self, tokens: int | torch.Tensor) -> None:
        """Tokens that went through one block's MLP (the token-count figure)."""
        if isinstance(tokens, torch.Tensor):
            self._ragged_tokens = _accumulate(self._ragged_tokens, tokens, self.batch)
        else:
            self._uniform_tokens += float(tokens)

    # -- reading -----------------------------------------------------------------------------
    def run_macs(self) -> torch.Tensor:
        """Executed backbone MACs per stream (backbone + method overhead)."""
        return sum(self.macs[c] for c in BACKBONE_CATEGORIES)

    def select(self, index: torch.Tensor | list[int]) -> "Ledger":
        """A ledger holding only the given streams (used when a batch is split into groups)."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = Ledger(len(index))
        for k, v in self.macs.items():
            out._macs[k] = v[index].clone()
        out._tokens = self.tokens[index].clone()
        return out

    def merge_into(self, other: "Ledger", index: torch.Tensor | list[int]) -> None:
        """Add this (sub-batch) ledger's counts into ``other`` at stream positions ``index``."""
        index = torch.as_tensor(index, dtype=torch.long)
        for k, v in self.macs.items():
            other.macs[k].index_add_(0, index, v)
        other.tokens.index_add_(0, index, self.tokens)


def _zeros(batch: int) -> torch.Tensor:
    # explicit device: counts stay on the CPU even inside a ``torch.device("meta")`` block
    return torch.zeros(batch, dtype=torch.float64, device="cpu")


def _accumulate(total: torch.Tensor | None, value: torch.Tensor, batch: int) -> torch.Tensor:
    """``total + value`` per stream, on ``value``'s device (a new tensor the first time: the
    caller's is never added into)."""
    value = _float64(value)
    if value.ndim == 0:
        value = value.expand(batch)
    elif value.shape != (batch,):
        raise ValueError(f"per-stream count has shape {tuple(value.shape)}, expected ({batch},)")
    if total is None:
        return value.clone()
    if total.device != value.device:  # counts from two devices: summed on the host
        return total.to("cpu") + value.to("cpu")
    return total + value  # not in place: ``total`` may have been made in inference mode


def _float64(count: torch.Tensor) -> torch.Tensor:
    count = count.detach()
    if count.device.type == "mps":  # no float64 there
        count = count.to("cpu")
    return count.to(torch.float64)


def _scale(count: int | torch.Tensor, factor: int) -> int | torch.Tensor:
    if isinstance(count, torch.Tensor):
        return _float64(count) * factor
    return count * factor
