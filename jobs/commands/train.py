"""``vidprune train``: train a zoo model on generated data and ship it as a zoo entry.

Resumable: run the same command again after an interruption and it continues from
``RUN_DIR/checkpoint.pt``. Progress goes to stderr, the loss log to ``RUN_DIR/loss.jsonl``.
At the end the model is saved (``--zoo-dir``/``NAME``.safetensors + .json card) and its dense
accuracy is measured on the val and test splits with the saved weights, through the same
``StreamRunner`` path as ``vidprune eval``, and written into the card.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..errors import UserError
from ..options import parse_key_values

#: The zoo recipes: what ``--task`` trains unless options say otherwise.
RECIPES = {
    "detection": {"name": "vitdet-synth", "arch": "vitdet-ti",
                  "options": {"input_size": 256, "window": 6, "depth": 8, "dim": 128,
                              "heads": 2, "neck_channels": 64, "neck_scales": [2.0],
                              "pretrain_grid": [16, 16]},
                  "steps": 2000, "batch": 8, "lr": 1e-3},
    "recognition": {"name": "videomae-synth", "arch": "videomae-ti",
                    "options": {"input_size": 112, "clip_frames": 16, "depth": 6, "dim": 128,
                                "heads": 2},
                    "steps": 3000, "batch": 8, "lr": 5e-4},
}


def _recipe_default(key: str) -> str:
    """A recipe value for --help: "default 8", or per task when the recipes differ."""
    values = {task: recipe[key] for task, recipe in RECIPES.items()}
    if len(set(values.values())) == 1:
        return f"default {next(iter(values.values())):g}"
    return "default " + ", ".join(f"{v:g} {task}" for task, v in values.items())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a zoo model on generated data (resumable)",
        description="Train the zoo detector or recognizer on data made by `vidprune generate`, "
                    "save it as a zoo entry with its model card, and measure it on val and test.")
    p.add_argument("--task", choices=sorted(RECIPES), required=True)
    p.add_argument("--data", required=True, help="the --out folder of `vidprune generate`")
    p.add_argument("--run-dir", required=True, help="checkpoint and loss log folder")
    p.add_argument("--name", help="zoo entry name (default: vitdet-synth / videomae-synth)")
    p.add_argument("--zoo-dir", default=None, help="where to write the entry (default: models/zoo)")
    p.add_argument("--arch", help="architecture (default per task)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, e.g. depth=8 (repeatable; JSON values)")
    p.add_argument("--steps", type=int, help=f"optimiser steps ({_recipe_default('steps')})")
    p.add_argument("--batch", type=int, help=f"batch size ({_recipe_default('batch')})")
    p.add_argument("--lr", type=float, help=f"peak learning rate ({_recipe_default('lr')})")
    p.add_argument("--warmup", type=int, default=200,
                   help="warm-up steps (default 200; at most half the steps)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for forward and loss (faster on CPUs with AMX)")
    p.add_argument("--seed", type=int, default=0, help="training seed (init and batches)")
    p.add_argument("--init-from", metavar="ZOO_NAME",
                   help="recognition: start the backbone from this zoo image model's weights "
                        "(inflated patch embedding, copied blocks)")
    p.add_argument("--limit-videos", type=int, help="use only this many training videos")
    p.add_argument("--eval-limit", type=int, help="evaluate on only this many val/test videos")
    p.add_argument("--no-eval", action="store_true", help="skip the val/test measurement")
    p.add_argument("--log-every", type=int, default=20,
                   help="steps between loss log lines (default 20)")
    p.add_argument("--checkpoint-every-s", type=float, default=300.0,
                   help="seconds between checkpoints in --run-dir (default 300)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from models import build_arch, build_method
    from models.registry import ZOO_DIR, ModelError, build_zoo_model, zoo_entries
    from models.runner import StreamRunner
    from models.training import TrainConfig, detection_loss, fit, recognition_loss, \
        save_zoo_entry
    from pipeline.training_data import DatasetError, dataset_meta, load_detection_frames, \
        load_recognition_clips

    recipe = RECIPES[args.task]
    name = args.name or recipe["name"]
    arch = args.arch or recipe["arch"]
    options = {**recipe["options"], **parse_key_values(args.option)} if not args.arch \
        else parse_key_values(args.option)
    steps = args.steps or recipe["steps"]
    batch = args.batch or recipe["batch"]
    lr = args.lr or recipe["lr"]
    for flag, value in (("--steps", steps), ("--batch", batch)):
        if value < 1:
            raise UserError(f"{flag} must be positive, got {value}")
    data_root = Path(args.data) / args.task
    try:
        meta = dataset_meta(data_root)
    except DatasetError as exc:
        raise UserError(str(exc)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        model = build_arch(arch, class_names=meta["classes"],
                           **{k: tuple(v) if isinstance(v, list) else v
                              for k, v in options.items()})
    except (ModelError, TypeError, ValueError) as exc:
        raise UserError(f"cannot build {arch} with {options}: {exc}") from None
    if model.task != args.task:
        raise UserError(f"{arch} is a {model.task} architecture, not {args.task}")
    if args.init_from:
        from models.training import inflate_image_backbone

        try:
            # the shipped zoo first, then the folder this run writes to
            shipped_zoo = zoo_entries()
            source = build_zoo_model(args.init_from,
                                     None if args.init_from in shipped_zoo else args.zoo_dir)
            copied = inflate_image_backbone(model, source.state_dict())
        except (ModelError, ValueError, KeyError) as exc:
            raise UserError(f"--init-from {args.init_from}: {exc}") from None
        print(f"initialised {len(copied)} tensors from {args.init_from}", file=sys.stderr)
    prep = StreamRunner(model, build_method("none"))  # the exact preprocessing of inference

    print(f"loading {args.task} training data from {data_root}", file=sys.stderr, flush=True)
    t_load = time.time()
    try:
        if args.task == "detection":
            data = load_detection_frames(data_root, "train", limit=args.limit_videos)
            n_items = len(data.frames)
        else:
            data = load_recognition_clips(data_root, "train", limit=args.limit_videos)
            n_items = len(data.labels)
    except DatasetError as exc:
        raise UserError(str(exc)) from None
    if n_items == 0:
        raise UserError(f"{data_root}/train has no videos")
    print(f"  {n_items} training items in {time.time() - t_load:.0f} s", file=sys.stderr)

    def next_batch(step: int):
        rng = np.random.default_rng([args.seed, step])  # a function of the step: resumable
        return labelled_batch(args.task, data, prep, batch, rng)

    if args.task == "detection":
        loss_fn = lambda m, b: detection_loss(m, *b)  # noqa: E731
    else:
        loss_fn = lambda m, b: recognition_loss(m, *b)  # noqa: E731
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=min(args.warmup, steps // 2),
                      log_every=args.log_every, checkpoint_every_s=args.checkpoint_every_s,
                      bf16=args.bf16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {name} ({arch}, {n_params / 1e6:.2f} M parameters) for {steps} steps of "
          f"{batch}", file=sys.stderr, flush=True)
    result = fit(model, loss_fn, next_batch, cfg, args.run_dir)

    zoo_dir = Path(args.zoo_dir) if args.zoo_dir else ZOO_DIR
    command = "vidprune train " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if sys.argv[1:2] == ["train"] else "vidprune " + " ".join(map(shlex.quote, sys.argv[1:]))
    card = {
        "task": args.task,
        "model_card": {
            "data": {"generator": "pipeline/synthetic.py", "seed": meta["seed"],
                     "generator_version": meta["generator_version"], "splits": meta["splits"],
                     "training_items": n_items},
            "command": command,
            "training": {"steps": result.steps, "batch": batch, "lr": lr,
                         "warmup_steps": cfg.warmup_steps, "seed": args.seed,
                         "train_s": round(result.train_s, 1),
                         "cpu_s": round(result.cpu_s, 1), "bf16_autocast": args.bf16,
                         "threads": torch.get_num_threads(), "final_loss": result.last},
            "initialised_from": args.init_from,
            "parameters": n_params,
            "weights_dtype": "float16",
            "metrics": {},
        },
    }
    weights, card_path = save_zoo_entry(model, zoo_dir / name, card)
    if not args.no_eval:
        from .eval import dense_metrics

        shipped = build_zoo_model(name, zoo_dir)  # the saved (float16) weights, as shipped
        metrics = {}
        for split in ("val", "test"):
            metrics[split] = dense_metrics(shipped, data_root, split, args.eval_limit)
            print(f"{split}: {metrics[split]}", file=sys.stderr, flush=True)
        full = json.loads(card_path.read_text())
        full["model_card"]["metrics"] = metrics
        card_path.write_text(json.dumps(full, indent=2) + "\n")
    full = json.loads(card_path.read_text())
    card_path.with_suffix(".md").write_text(card_markdown(name, full, weights.stat().st_size))
    print(weights)
    return 0


def labelled_batch(task: str, data, prep, batch: int, rng):
    """A random training batch of ``data`` (``load_detection_frames`` or
    ``load_recognition_clips`` output) with its labels, augmented and preprocessed as the
    runner preprocesses (``prep``: a ``StreamRunner`` of the model): detection (images,
    boxes, classes), boxes in input pixels; recognition (clips, class ids)."""
    import numpy as np
    import torch

    from models.runner import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.training_data import augment_clip, flip_detection, trainable_boxes

    n_items = len(data.frames) if task == "detection" else len(data.labels)
    idx = rng.integers(0, n_items, size=batch)
    if task == "detection":
        images, boxes, labels = [], [], []
        for i in idx:
            frame, lab = data.frames[i], data.labels[i]
            keep = trainable_boxes(lab)
            bx, lb = lab.boxes[keep], lab.labels[keep]
            if rng.random() < 0.5:
                frame, bx = flip_detection(frame, bx)
            img, scale, _ = prep.preprocess_detection(np.ascontiguousarray(frame))
            images.append(img)
            boxes.append(torch.from_numpy(bx * scale))
            labels.append(torch.from_numpy(lb))
        return torch.stack(images), boxes, labels
    mean = torch.tensor(getattr(prep.model, "pixel_mean", IMAGENET_MEAN)).view(3, 1, 1)
    std = torch.tensor(getattr(prep.model, "pixel_std", IMAGENET_STD)).view(3, 1, 1)
    clips, labels = [], []
    for i in idx:
        clip, label = augment_clip(data.clips[i], int(data.labels[i]), rng)
        if clip.shape[1:3] == (prep.input_size, prep.input_size):
            # already the input size: the runner's resize and crop are the identity, so
            # normalise the whole clip at once
            x = torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).float()
            clips.append((x - mean[:, None]) / std[:, None])
        else:
            frames = [prep.preprocess_recognition(np.ascontiguousarray(f)) for f in clip]
            clips.append(torch.stack(frames, dim=1))
        labels.append(label)
    return torch.stack(clips), torch.tensor(labels)


def card_markdown(name: str, card: dict, weights_bytes: int) -> str:
    """The human-readable model card, written from the JSON card (every figure in it was
    measured by the training command)."""
    mc = card["model_card"]
    data, tr = mc["data"], mc["training"]
    options = ", ".join(f"{k}={v}" for k, v in card["options"].items())
    lines = [
        f"# {name}",
        "",
        f"A {card['task']} model trained on vidprune's generated benchmark "
        f"(`pipeline/synthetic.py`), "
        + (f"its backbone started from `{mc['initialised_from']}` (inflated)"
           if mc.get("initialised_from") else "from scratch")
        + "; one of the zoo models jobs use by default.",
        "",
        f"- architecture: `{card['arch']}` with {options}",
        f"- parameters: {mc['parameters']:,}; weights: {mc['weights_dtype']} safetensors, "
        f"{weights_bytes / 1e6:.1f} MB",
        f"- classes: {', '.join(card['class_names'])}",
        f"- data: generator version {data['generator_version']}, seed {data['seed']}, splits "
        f"{data['splits']} ({data['training_items']} training items)",
        f"- training: {tr['steps']} steps of {tr['batch']}, AdamW, peak lr {tr['lr']}, "
        f"{tr['warmup_steps']} warm-up steps then cosine, seed {tr['seed']}"
        f"{', bfloat16 autocast' if tr.get('bf16_autocast') else ''}; "
        f"{tr['train_s'] / 60:.1f} min wall ({tr['cpu_s'] / 60:.1f} min of CPU time) on "
        f"{tr['threads']} CPU thread(s) of a shared machine",
        "",
        "Command (after `vidprune generate --out runs/synth --seed "
        f"{data['seed']}`):",
        "",
        "```",
        mc["command"],
        "```",
        "",
        "## Dense accuracy (measured on the shipped float16 weights, through StreamRunner)",
        "",
        "| split | metric | value | videos | frames | backbone GMACs/frame |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for split, m in mc.get("metrics", {}).items():
        metric = "map50" if "map50" in m else "top1"
        lines.append(f"| {split} | {metric} | {100 * m[metric]:.2f} | {m['videos']} | "
                     f"{m['frames']} | {m['gmacs_per_frame']:.4f} |")
    return "\n".join(lines) + "\n"

