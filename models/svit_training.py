"""Training SViT gates by fine-tuning (SViT, WACV 2024; docs/ARCHITECTURE.md), pure PyTorch.

The training forward keeps the full token map: each gated block draws hard keep bits with the
Gumbel-softmax (straight-through), runs on the whole map with the pruned tokens masked out as
keys, and takes ``keep * block(x) + (1 - keep) * x``, so a pruned token keeps its features and
the gate gets a gradient through both branches. The loss is the task loss plus
``ratio_weight * sum over gated blocks of (mean(keep) - target)^2`` (weight 4, as the authors';
their code averages over the gated blocks instead of summing: ``ratio_reduction="mean"``).

Task loss: with labels, the model's own training loss, as the paper fine-tunes on its task:
cross-entropy for recognizers and classifiers, for detectors the CenterNet loss of
``models.training`` (labels = per image (boxes, classes), boxes in input pixels) on the
gated map through the detector's norm, neck and head. Without labels the gated
model is distilled to the same model run densely ("keep the dense model's output with fewer
tokens"; no annotations needed):

- ``distill="logits"`` (the default for recognizers and classifiers): cross-entropy against
  the dense model's class probabilities (soft distillation, as DeiT's). It is on the scale of
  the paper's task loss, a cross-entropy, which the ratio weight 4 was set against.
- ``distill="features"`` (the default for detectors): mean squared error between the final
  backbone feature maps (after the backbone's final norm, the map the neck sees), since a
  detector has no class distribution per input. Its scale is that of the features; on a
  recognizer (feature variance about 18) it outweighs the ratio loss many times over, and
  even the training keep bits stay well above their targets.

Known limit of the paper's recipe (docs/RESULTS.md, SViT notes): the ratio loss is met in
expectation when every token's keep probability sits near its block's target, and nothing
in it pushes a gate to decide when the task does not care which of many similar tokens it
keeps. Inference (keep iff the keep logit wins) then keeps nearly all tokens of a block
whose target is above 0.5 and few below; measured so with the task loss on labels and the
whole model fine-tuned for 600 steps of 8. Settling (below) is what made the zoo models'
inference keep fractions follow their targets.

Settling (``settle`` > 0; a deviation from the paper, off by default). Over the last
``settle`` share of the steps the Gumbel noise of the keep bits fades linearly to 0
(``keep_bits``: hard bit ``logp + noise * Gumbel`` favours keeping, straight-through gradient
of ``softmax(... / tau)``), so the training ends on exactly the decisions inference makes
(keep iff the keep logit wins), and the keep-ratio loss, unchanged, then holds those
decisions, not their expectation, to the targets; the task loss meanwhile decides which
tokens cross. Everything else stays the paper's: hard keep bits, pruned tokens masked as
keys, ratio loss weight 4, and the inference rule.

Only the gates train by default; ``backbone_lr`` > 0 also fine-tunes the rest of the model at
that rate (the dense teacher is then a frozen copy). The authors fine-tune the whole model
with its gates (all parameters at one rate, 1e-5 at their batch sizes).

Training data is any iterable of ``(inputs, labels)``: inputs are preprocessed clips
(B, 3, T, H, W) for clip models and recognizers, images (B, 3, H, W) for frame models; labels
a (B,) long tensor, for detectors (boxes, classes) lists, or ``None``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .methods.svit import SViT, SViTGates, SViTState, gates_of
from .vit import Embedded, ViT


@dataclass
class GateTraining:
    """Settings of one fine-tuning run."""

    steps: int = 200
    lr: float = 1e-3                 # gates
    backbone_lr: float = 0.0         # 0: everything but the gates is frozen
    weight_decay: float = 0.05       # AdamW, as the DeiT recipe the authors fine-tune with
    ratio_weight: float = 4.0
    ratio_reduction: str = "sum"     # "mean": the authors' code
    tau: float = 1.0                 # Gumbel-softmax temperature (the authors' 1)
    distill: str = "auto"            # without labels: "logits", "features"; "auto" picks by task
    schedule: str = "constant"       # "cosine": both rates decay to 0 (DeiT's recipe)
    settle: float = 0.0              # share of final steps over which the Gumbel noise fades
    #                                  to 0 (0: the paper, noise throughout; module docstring)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.settle <= 1.0:
            raise ValueError(f"settle must be in [0, 1], got {self.settle}")
        if self.ratio_reduction not in ("sum", "mean"):
            raise ValueError(f"ratio_reduction must be 'sum' or 'mean', "
                             f"got {self.ratio_reduction!r}")
        if self.distill not in ("auto", "logits", "features"):
            raise ValueError(f"distill must be 'auto', 'logits' or 'features', "
                             f"got {self.distill!r}")


@dataclass
class StepRecord:
    step: int
    loss: float
    task_loss: float
    ratio_loss: float
    keep: list[float] = field(default_factory=list)  # mean keep bit per gated block (training)
    noise: float = 1.0                                # Gumbel noise scale of the step


def keep_bits(logp: torch.Tensor, tau: float = 1.0, noise: float = 1.0) -> torch.Tensor:
    """Hard keep bits (..., n) from gate log-probabilities (..., n, 2), straight-through:
    the forward value is 1 where ``logp + noise * Gumbel`` favours keeping, the gradient that
    of ``softmax((logp + noise * Gumbel) / tau)``. ``noise`` 1 is ``F.gumbel_softmax(logp,
    tau, hard=True)`` (the same draws); ``noise`` 0 gives the inference decisions (keep iff
    the keep logit wins, a tie prunes)."""
    gumbels = -torch.empty_like(logp).exponential_().log()
    z = (logp + noise * gumbels) / tau
    soft = z.softmax(dim=-1)[..., 0]
    hard = (z[..., 0] > z[..., 1]).to(soft.dtype)
    return hard - soft.detach() + soft


def noise_at(step: int, config: "GateTraining") -> float:
    """The Gumbel noise scale of ``step`` (1-based): 1 (the paper) until the last
    ``config.settle`` share of the steps, then falling linearly to 0 at the last step."""
    settle_steps = round(config.settle * config.steps)
    start = config.steps - settle_steps
    if settle_steps == 0 or step <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / settle_steps)


def lr_scale(step: int, config: "GateTraining") -> float:
    """The learning-rate factor of ``step`` (1-based): 1 throughout, or a cosine from 1 at the
    first step to 0 after the last (``schedule="cosine"``, as the DeiT recipe decays)."""
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - 1) / config.steps))


def gated_forward_train(backbone: ViT, emb: Embedded, gates: SViTGates, tau: float = 1.0,
                        noise: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The differentiable full-map forward: final tokens and the keep bits (B, N) per gate
    (``keep_bits``; ``noise`` scales the Gumbel noise)."""
    x, p = emb.tokens, emb.prefix
    keeps = []
    for i, blk in enumerate(backbone.blocks):
        gate = gates.gate(i)
        if gate is None:
            x, _ = blk(x, emb.grid, p)
            continue
        keep = keep_bits(gate(x[:, p:]), tau, noise)
        keep_all = torch.cat([keep.new_ones(keep.shape[0], p), keep], dim=1) if p else keep
        y, _, _ = blk.forward_qkv(x, emb.grid, p, key_mask=keep_all.detach() > 0.5)
        w = keep_all.unsqueeze(-1)
        x = w * y + (1 - w) * x
        keeps.append(keep)
    return x, keeps


def _is_frame_recognizer(model: nn.Module) -> bool:
    return hasattr(model, "forward_temporal")  # ViViT: spatial model per frame, then temporal


def _embed(model: nn.Module, inputs: torch.Tensor) -> Embedded:
    if _is_frame_recognizer(model):  # one spatial input per time step (a tubelet of frames)
        inputs = model.stack_steps(inputs)
    return model.backbone.embed(inputs)


def _logits(model: nn.Module, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    if _is_frame_recognizer(model):
        frames = model.frame_embedding(tokens).view(batch, -1, tokens.shape[-1])
        return model.forward_temporal(frames)
    return model.forward_head(tokens)


def _features(backbone: ViT, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    return backbone.norm(tokens[:, prefix:])


def _detection_loss(model: nn.Module, tokens: torch.Tensor, emb: Embedded, labels) -> torch.Tensor:
    """The detector's own training loss (CenterNet, ``models.training``) on the gated map;
    ``labels`` = (boxes, classes): per image, (n, 4) x0 y0 x1 y1 in input pixels and (n,)."""
    from .training import raw_from_tokens, raw_loss

    boxes, classes = labels
    raw = raw_from_tokens(model, tokens[:, emb.prefix:], emb.grid)
    return raw_loss(model, raw, list(boxes), list(classes))["loss"]


def _classifies(model: nn.Module) -> bool:
    return getattr(model, "task", None) in ("recognition", "classification")


def distill_mode(model: nn.Module, config: GateTraining) -> str:
    """What the label-free task loss compares: "logits" or "features" (module docstring)."""
    if config.distill != "auto":
        if config.distill == "logits" and not _classifies(model):
            raise ValueError(f"distill='logits' needs a recognizer or classifier, "
                             f"not a {getattr(model, 'task', '?')} model")
        return config.distill
    return "logits" if _classifies(model) else "features"


def ratio_loss(keeps: list[torch.Tensor], targets: list[float], reduction: str = "sum"
               ) -> torch.Tensor:
    """``sum`` (or ``mean``) over gated blocks of ``(mean(keep) - target)^2``; the mean runs
    over the batch and its tokens together (the authors' default)."""
    terms = torch.stack([(k.mean() - t) ** 2 for k, t in zip(keeps, targets)])
    return terms.sum() if reduction == "sum" else terms.mean()


def train_gates(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                config: GateTraining | None = None,
                on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
    """Fine-tune the SViT gates of ``model`` (attach them first, ``attach_gates``) on
    ``batches`` for ``config.steps`` steps (fewer if the iterable ends). Returns the history;
    ``on_step`` sees every record as it is made (progress display)."""
    config = config or GateTraining()
    backbone = model.backbone
    gates = gates_of(backbone)
    if gates is None:
        raise ValueError("the model has no SViT gates; call attach_gates(model) first")
    mode = distill_mode(model, config)
    gate_params = list(gates.parameters())
    gate_ids = {id(p) for p in gate_params}
    rest = [p for p in model.parameters() if id(p) not in gate_ids]
    train_rest = config.backbone_lr > 0
    teacher = copy.deepcopy(model).eval() if train_rest else model
    for p in rest:
        p.requires_grad_(train_rest)
    for p in gate_params:
        p.requires_grad_(True)
    groups = [{"params": gate_params, "lr": config.lr}]
    if train_rest:
        groups.append({"params": rest, "lr": config.backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    # dropout stays off; the backbone is in training mode only when it trains (the
    # learned position table is then recomputed with gradients)
    model.eval()
    backbone.train(train_rest)
    history: list[StepRecord] = []
    device = next(gates.parameters()).device
    for step, (inputs, labels) in enumerate(batches, start=1):
        if step > config.steps:
            break
        inputs = inputs.to(device)
        emb = _embed(model, inputs)
        scale = lr_scale(step, config)
        for group, base_lr in zip(opt.param_groups, base_lrs):
            group["lr"] = base_lr * scale
        noise = noise_at(step, config)
        tokens, keeps = gated_forward_train(backbone, emb, gates, config.tau, noise)
        if labels is not None and _classifies(model):
            task = F.cross_entropy(_logits(model, tokens, inputs.shape[0]), labels.to(device))
        elif labels is not None and getattr(model, "task", None) == "detection":
            task = _detection_loss(model, tokens, emb, labels)
        else:
            with torch.no_grad():
                t_emb = _embed(teacher, inputs)
                t_tokens, _ = teacher.backbone.forward_blocks(t_emb.tokens, t_emb.grid)
                if mode == "logits":
                    target = _logits(teacher, t_tokens, inputs.shape[0]).softmax(dim=-1)
                else:
                    target = _features(teacher.backbone, t_tokens, t_emb.prefix)
            if mode == "logits":
                task = F.cross_entropy(_logits(model, tokens, inputs.shape[0]), target)
            else:
                task = F.mse_loss(_features(backbone, tokens, emb.prefix), target)
        ratio = ratio_loss(keeps, gates.keep_ratios, config.ratio_reduction)
        loss = task + config.ratio_weight * ratio
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"gate training diverged at step {step} (loss {loss})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        record = StepRecord(step, float(loss.detach()), float(task.detach()),
                            float(ratio.detach()), [float(k.detach().mean()) for k in keeps],
                            noise)
        history.append(record)
        if on_step is not None:
            on_step(record)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history


@dataclass
class KeepMeasure:
    """What the gates do at inference on some inputs, per gated block: the fraction of tokens
    kept (hard decisions), and the mean keep probability (the expected fraction of the
    training's Gumbel keep bits, which the keep-ratio loss drives to the target). The two
    agree once the gates are confident; a gate unsure about every token (probability near
    0.5) keeps all or nothing."""

    fraction: list[float]
    probability: list[float]


@torch.no_grad()
def measure_keep(model: nn.Module, inputs: torch.Tensor) -> KeepMeasure:
    """Run the SViT inference path on ``inputs`` and report what each gate kept."""
    model.eval()
    emb = _embed(model, inputs)
    state = SViTState()
    SViT().forward(model.backbone, emb, state, None, None)
    return KeepMeasure([float(v) for v in state.keep_fraction.mean(dim=0)],
                       [float(v) for v in state.keep_probability.mean(dim=0)])
