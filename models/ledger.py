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
    are kept as they are, each with the sum of the factors it was counted with (a Python
    float), and multiplied, summed on their own device and moved to the host when read, once
    per step: moving each one at once would wait for the GPU at every counting call, and
    multiplying and adding at once would launch two kernels per call. So a tensor must not
    change in place after it is counted. The sums are the same: every count is a whole number
    far below 2**53, so float64 adds them exactly in any order.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._macs = {name: _zeros(batch) for name in CATEGORIES}
        self._tokens = _zeros(batch)
        self._uniform = dict.fromkeys(CATEGORIES, 0.0)  # per stream, not yet in ``_macs``
        self._uniform_tokens = 0.0
        # category (or "tokens") -> id -> [per-stream tensor, sum of its factors], not yet read
        self._ragged: dict[str, dict[int, list]] = {}

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
        for name in CATEGORIES:
            if name in self._ragged:
                self._macs[name] += _fold(self._ragged.pop(name), self.batch)
        return self._macs

    @property
    def tokens(self) -> torch.Tensor:
        """(batch,) float64: tokens through each block's MLP, per stream, summed over blocks."""
        if self._uniform_tokens:
            self._tokens += self._uniform_tokens
            self._uniform_tokens = 0.0
        if "tokens" in self._ragged:
            self._tokens += _fold(self._ragged.pop("tokens"), self.batch)
        return self._tokens

    @tokens.setter
    def tokens(self, value: torch.Tensor) -> None:  # ``ledger.tokens += ...`` reads, then sets
        self._tokens, self._uniform_tokens = value, 0.0
        self._ragged.pop("tokens", None)

    # -- recording ---------------------------------------------------------------------------
    def add(self, macs: int | float | torch.Tensor, category: str = "backbone",
            times: int = 1) -> None:
        """Record ``times * macs`` per stream (a number applies to every stream of the
        batch; a tensor is read when the ledger is, see the class docstring)."""
        if category not in self._uniform:
            raise KeyError(f"unknown ledger category {category!r}; expected one of {CATEGORIES}")
        if isinstance(macs, torch.Tensor):
            self._record(category, macs, times)
        else:
            self._uniform[category] += float(macs) * times

    def _record(self, key: str, count: torch.Tensor, times: int) -> None:
        if count.ndim != 0 and count.shape != (self.batch,):
            raise ValueError(f"per-stream count has shape {tuple(count.shape)}, "
                             f"expected ({self.batch},)")
        entry = self._ragged.setdefault(key, {}).get(id(count))
        if entry is None:  # the tensor is kept, so its id is not reused before it is read
            self._ragged[key][id(count)] = [count, float(times)]
        else:
            entry[1] += times

    def linear(self, layer: torch.nn.Linear, tokens: int | torch.Tensor,
               category: str = "backbone") -> None:
        """A Linear layer applied to ``tokens`` rows per stream (bias additions included)."""
        per_token = layer.in_features * layer.out_features
        if layer.bias is not None:
            per_token += layer.out_features
        self.add(tokens, category, per_token)

    def matmul(self, out_elements: int | torch.Tensor, inner: int,
               category: str = "backbone") -> None:
        """A matrix product with ``out_elements`` outputs per stream and inner size ``inner``."""
        self.add(out_elements, category, inner)

    def adds(self, elements: int | torch.Tensor, category: str = "backbone") -> None:
        """Elementwise additions (residuals, biases, position terms)."""
        self.add(elements, category)

    def processed(self, tokens: int | torch.Tensor) -> None:
        """Tokens that went through one block's MLP (the token-count figure)."""
        if isinstance(tokens, torch.Tensor):
            self._record("tokens", tokens, 1)
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


def _fold(entries: dict[int, list], batch: int) -> torch.Tensor:
    """(batch,) float64 on the CPU: the sum of each recorded tensor times its factors, summed
    on the tensors' device (on the CPU when they are on several) and moved once."""
    terms = [_float64(count) * times for count, times in entries.values()]
    if len({t.device for t in terms}) > 1:
        terms = [t.to("cpu") for t in terms]
    total = terms[0].expand(batch)
    for t in terms[1:]:
        total = total + t
    return total.to("cpu")


def _float64(count: torch.Tensor) -> torch.Tensor:
    count = count.detach()
    if count.device.type == "mps":  # no float64 there
        count = count.to("cpu")
    return count.to(torch.float64)
