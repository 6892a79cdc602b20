"""Training the zoo models: losses, a resumable training loop, and saving a zoo entry.

Pure PyTorch. The caller supplies batches (``next_batch(step)``); this module knows nothing
of how videos are stored.

- Detection: CenterNet's losses for :class:`models.heads.CenterNetHead` (penalty-reduced
  focal loss on Gaussian class heatmaps, L1 on box size and centre offset at object centres),
  with targets in the head's own units (size in stride cells, as ``decode`` reads them).
- Recognition: cross-entropy with label smoothing.
- :func:`fit`: AdamW, linear warm-up then cosine decay, gradient clipping, a checkpoint every
  few minutes (model, optimiser, step, RNG states, loss log) from which the same command
  resumes, a JSON-lines loss log and one progress line per logging interval.
- :func:`save_zoo_entry`: weights as safetensors (float16 to keep the repository small) and
  the JSON card ``models/registry.py`` reads.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .heads import CenterNetHead

# --- detection ------------------------------------------------------------------------------

def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest corner shift that keeps IoU >= ``min_overlap`` in all
    three of its cases (both corners in, both out, one of each)."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


@dataclass
class CenterNetTargets:
    heatmap: torch.Tensor    # (B, C, h, w) in [0, 1]
    index: torch.Tensor      # (B, K) flat cell of each object's centre
    size: torch.Tensor       # (B, K, 2) box width, height in cells
    offset: torch.Tensor     # (B, K, 2) sub-cell centre offset
    mask: torch.Tensor       # (B, K) 1 for real objects, 0 for padding


def centernet_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int,
                      grid: tuple[int, int], stride: int) -> CenterNetTargets:
    """Targets for a batch: per image, ``boxes`` (n, 4) x0 y0 x1 y1 in input pixels and their
    class ids. Each object paints a Gaussian peak (CenterNet radius) at its centre cell."""
    b = len(boxes)
    h, w = grid
    k = max([len(x) for x in boxes] + [1])
    heat = torch.zeros(b, num_classes, h, w)
    index = torch.zeros(b, k, dtype=torch.long)
    size = torch.zeros(b, k, 2)
    offset = torch.zeros(b, k, 2)
    mask = torch.zeros(b, k)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        for j, (box, cls) in enumerate(zip(bx.tolist(), lb.tolist())):
            x0, y0, x1, y1 = (v / stride for v in box)
            bw, bh = x1 - x0, y1 - y0
            if bw <= 0 or bh <= 0:
                continue
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            radius = max(0, int(gaussian_radius(bh, bw)))
            sigma = (2 * radius + 1) / 6
            g = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma * sigma))
            g[(xs - ix).abs().expand(h, w) > radius] = 0
            g[(ys - iy).abs().expand(h, w) > radius] = 0
            heat[i, cls] = torch.maximum(heat[i, cls], g)
            index[i, j] = iy * w + ix
            size[i, j] = torch.tensor([bw, bh])
            offset[i, j] = torch.tensor([cx - ix, cy - iy])
            mask[i, j] = 1.0
    return CenterNetTargets(heat, index, size, offset, mask)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
               beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, normalised by the number of peaks."""
    pred = logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = 1.0 - pos
    pos_loss = torch.log(pred) * (1 - pred) ** alpha * pos
    neg_loss = torch.log(1 - pred) * pred ** alpha * (1 - target) ** beta * neg
    n = pos.sum()
    return -(pos_loss.sum() + neg_loss.sum()) / n.clamp(min=1.0)


def _gather(raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w) map read at flat cells ``index`` (B, K) -> (B, K, 2)."""
    b, c = raw.shape[:2]
    flat = raw.float().view(b, c, -1)
    return flat.gather(2, index[:, None, :].expand(b, c, index.shape[1])).transpose(1, 2)


def centernet_loss(raw: dict[str, torch.Tensor], t: CenterNetTargets,
                   size_weight: float = 0.1, offset_weight: float = 1.0
                   ) -> dict[str, torch.Tensor]:
    """CenterNet's loss terms and their weighted sum (``loss``)."""
    heat = focal_loss(raw["heatmap"], t.heatmap)
    m = t.mask[..., None]
    n = t.mask.sum().clamp(min=1.0)
    size = (F.l1_loss(_gather(raw["size"], t.index), t.size, reduction="none") * m).sum() / n
    off = (F.l1_loss(_gather(raw["offset"], t.index), t.offset, reduction="none") * m).sum() / n
    return {"loss": heat + size_weight * size + offset_weight * off, "heatmap": heat,
            "size": size, "offset": off}


def detector_raw(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The CenterNet head's raw maps for preprocessed images (B, 3, H, W): the same
    backbone, norm, neck and head path as ``ViTDetector.forward``, without decoding."""
    e = model.backbone.embed(images)
    tokens, _ = model.backbone.forward_blocks(e.tokens, e.grid)
    return raw_from_tokens(model, tokens, e.grid)


def raw_from_tokens(model: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]
                    ) -> dict[str, torch.Tensor]:
    """The CenterNet head's raw maps for final backbone tokens (B, N, D) on ``grid``: norm,
    neck and head, as ``ViTDetector.forward_head``, without decoding."""
    if not isinstance(model.head, CenterNetHead):
        raise TypeError("training supports the CenterNet head only")
    b, _, d = tokens.shape
    fmap = model.backbone.norm(tokens).transpose(1, 2).reshape(b, d, *grid)
    return model.head(model.neck(fmap))


def raw_loss(model: nn.Module, raw: dict[str, torch.Tensor], boxes: list[torch.Tensor],
             labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CenterNet loss of raw maps against boxes (input pixels) and class ids."""
    grid = tuple(raw["heatmap"].shape[-2:])
    t = centernet_targets(boxes, labels, model.head.num_classes, grid, model.head.stride)
    return centernet_loss(raw, t)


def detection_loss(model: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor],
                   labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return raw_loss(model, detector_raw(model, images), boxes, labels)


def recognition_loss(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor,
                     smoothing: float = 0.1) -> dict[str, torch.Tensor]:
    logits = model(clips)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    acc = (logits.argmax(-1) == labels).float().mean()
    return {"loss": loss, "accuracy": acc.detach()}


# --- the training loop ----------------------------------------------------------------------

@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    clip_grad: float = 1.0
    log_every: int = 20
    checkpoint_every_s: float = 300.0
    #: run forward and loss under bfloat16 autocast (weights and optimiser stay float32);
    #: about 1.6x faster on CPUs with AMX / AVX512-BF16
    bf16: bool = False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, position tables and class tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "pos" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


@dataclass
class TrainResult:
    steps: int
    train_s: float                      # wall time spent training, over all resumed runs
    cpu_s: float                        # CPU time of this process spent training, likewise
    last: dict[str, float] = field(default_factory=dict)


def fit(model: nn.Module, loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
        next_batch: Callable[[int], Any], cfg: TrainConfig, run_dir: str | Path,
        on_log: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` steps, resuming from ``run_dir/checkpoint.pt``.

    ``next_batch(step)`` returns the batch for a step; it must be a function of the step (and
    of state restored with the checkpoint), so a resumed run sees the batches an uninterrupted
    one would have seen. Writes ``run_dir/loss.jsonl`` (one line per logging interval) and
    ``run_dir/checkpoint.pt``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    log_path = run_dir / "loss.jsonl"
    opt = make_optimizer(model, cfg)
    step, train_s, cpu_s = 0, 0.0, 0.0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, train_s = int(ckpt["step"]), float(ckpt["train_s"])
        cpu_s = float(ckpt.get("cpu_s", 0.0))
        torch.set_rng_state(ckpt["torch_rng"])
        _trim_log(log_path, step)
        print(f"resuming at step {step}/{cfg.steps} ({train_s / 60:.1f} min trained)",
              file=sys.stderr, flush=True)

    def save() -> None:
        tmp = ckpt_path.with_name("checkpoint.pt.part")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "train_s": train_s, "cpu_s": cpu_s, "torch_rng": torch.get_rng_state()},
                   tmp)
        os.replace(tmp, ckpt_path)

    model.train()
    sums: dict[str, float] = {}
    count = 0
    last_save = time.monotonic()
    last: dict[str, float] = {}
    t0, c0 = time.monotonic(), time.process_time()
    with open(log_path, "a") as log:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = next_batch(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                out = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            step += 1
            now, now_cpu = time.monotonic(), time.process_time()
            train_s += now - t0
            cpu_s += now_cpu - c0
            t0, c0 = now, now_cpu
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                last = {k: v / count for k, v in sums.items()}
                rec = {"step": step, "lr": lr, "train_s": round(train_s, 1),
                       "cpu_s": round(cpu_s, 1), **last}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                eta = train_s / step * (cfg.steps - step) if step else 0.0
                print(f"step {step}/{cfg.steps}  " +
                      "  ".join(f"{k} {v:.4f}" for k, v in last.items()) +
                      f"  lr {lr:.2e}  {train_s / 60:.1f} min ({cpu_s / 60:.1f} CPU), "
                      f"eta {eta / 60:.1f} min",
                      file=sys.stderr, flush=True)
                if on_log is not None:
                    on_log(step, last)
                sums, count = {}, 0
            if now - last_save >= cfg.checkpoint_every_s or step == cfg.steps:
                save()
                last_save = time.monotonic()
                t0, c0 = last_save, time.process_time()  # saving is not training
    model.eval()
    return TrainResult(step, train_s, cpu_s, last)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint's step (written after it by an interrupted run)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


# --- the zoo --------------------------------------------------------------------------------

def save_zoo_entry(model: nn.Module, path_stem: str | Path, card: dict[str, Any],
                   dtype: torch.dtype = torch.float16) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (weights in ``dtype``) and ``<stem>.json`` (``arch``,
    ``options``, ``class_names`` plus the model card ``card``). Loading casts back to the
    model's dtype; the card's metrics are measured on the saved (cast) weights by the caller."""
    from safetensors.torch import save_file

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    weights = stem.with_suffix(".safetensors")
    tmp = weights.with_name(weights.name + ".part")
    save_file(state, str(tmp), metadata={"arch": model.arch.name})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its file readable by the owner only
    os.replace(tmp, weights)
    options = {k: (list(v) if isinstance(v, tuple) else v)
               for k, v in model.build_options.items()}
    meta = {"arch": model.arch.name, "options": options,
            "class_names": list(model.class_names), **card}
    card_path = stem.with_suffix(".json")
    card_path.write_text(json.dumps(meta, indent=2) + "\n")
    return weights, card_path


# --- initialisation from an image backbone ----------------------------------------------------

def inflate_image_backbone(video_model: nn.Module, image_state: dict[str, torch.Tensor]
                           ) -> list[str]:
    """Initialise a clip model's backbone from an image ViT's weights (I3D-style inflation,
    as video transformers are usually started from image models): every 2-D patch filter is
    repeated over the tubelet's frames and divided by their number (a still clip then embeds
    as the image would), and the blocks' norms, qkv, projections and MLPs are copied for as
    many blocks as both have. Relative-position tables and heads are not copied. Returns the
    names of the parameters that were set."""
    own = video_model.state_dict()
    new, done = {}, []
    w2 = image_state.get("backbone.patch_embed.proj.weight")
    w3 = own["backbone.patch_embed.proj.weight"]
    if w2 is None or w2.shape[:2] != w3.shape[:2] or w2.shape[-2:] != w3.shape[-2:]:
        raise ValueError("the image backbone's patch embedding does not fit the clip model")
    frames = w3.shape[2]
    new["backbone.patch_embed.proj.weight"] = (w2.float()[:, :, None] / frames).expand_as(w3)
    new["backbone.patch_embed.proj.bias"] = image_state["backbone.patch_embed.proj.bias"]
    for key in own:
        parts = key.split(".")
        if key.startswith("backbone.blocks.") and "rel_pos" not in parts[-1]:
            if key in image_state and image_state[key].shape == own[key].shape:
                new[key] = image_state[key]
    for key, value in new.items():
        own[key] = value.to(own[key].dtype).clone()
        done.append(key)
    video_model.load_state_dict(own)
    return done
