"""``vidprune train-gates``: fine-tune SViT token gates on a model and write a checkpoint.

Reads a plain folder of videos with decord and distils the gated model to the same model run
densely (no labels needed): to its class probabilities for recognizers and classifiers, to its
final feature map for detectors (see ``models/svit_training.py``). With ``--labels`` it reads
instead the labelled training split of a task folder made by ``vidprune generate`` and trains
on the model's own task loss, as the paper fine-tunes on its task (cross-entropy for
recognizers, the CenterNet loss of ``vidprune train`` for detectors), with the same
augmentation and preprocessing as ``vidprune train``. Writes ``--out`` (safetensors:
the model's weights plus its gates) and a zoo card beside it (``<out>.json``: architecture,
options with the gate spec, class names, how the gates were trained). Copying both into
``models/zoo/`` ships the model as a zoo entry that runs with ``pruning.method: svit``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..options import parse_key_values

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-gates", help="fine-tune SViT token gates and write a checkpoint with them",
        description="Fine-tune SViT token gates on a model (distilled to the dense model on a "
                    "folder of videos) and write a checkpoint plus a zoo card.")
    p.add_argument("--model", required=True, help="zoo name or architecture (e.g. videomae-s)")
    p.add_argument("--checkpoint", help="weights for an architecture (.safetensors, .pth ...)")
    p.add_argument("--zoo-dir", help="read --model from this folder of zoo entries (a "
                                     "checkpoint and card that train or train-gates wrote) "
                                     "instead of models/zoo")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, VALUE as JSON (e.g. depth=6); repeatable")
    p.add_argument("--data", required=True,
                   help="folder of videos (searched recursively); with --labels, a task folder "
                        "of `vidprune generate` (e.g. runs/synth/recognition)")
    p.add_argument("--labels", action="store_true",
                   help="train on the labels of --data's train split with the model's task "
                        "loss (cross-entropy, or CenterNet's for detectors) instead of "
                        "distilling to the dense model")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors); the zoo card "
                                                "is written beside it as .json")
    p.add_argument("--steps", type=int, default=200, help="optimisation steps (default 200)")
    p.add_argument("--batch", type=int, default=2, help="clips or frames per step (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="gate learning rate (default 1e-3)")
    p.add_argument("--backbone-lr", type=float, default=0.0,
                   help="also fine-tune the rest of the model at this rate (default 0: frozen; "
                        "the paper fine-tunes the whole model)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rates: constant (default) or a cosine decay to 0 over the "
                        "steps (the DeiT recipe the paper fine-tunes with; with --settle it "
                        "did worse on the zoo recognizer, the gates' rate being near 0 while "
                        "the noise fades: docs/RESULTS.md, run I)")
    p.add_argument("--settle", type=float, default=0.0,
                   help="share of the final steps over which the Gumbel noise of the keep "
                        "bits fades to 0, so that training ends on the inference decisions "
                        "(default 0: noise throughout, as the paper; a deviation, see "
                        "models/svit_training.py)")
    p.add_argument("--dense-blocks", type=int,
                   help="blocks left ungated in front (default: depth // 4, the authors' 3 of 12)")
    p.add_argument("--keep-ratios", help="comma-separated keep targets, one per gated block "
                                         "(default: 0.7, 0.49, 0.343 in three groups)")
    p.add_argument("--distill", choices=("auto", "logits", "features"), default="auto",
                   help="what the gated model matches of the dense one: class probabilities "
                        "(logits) or the final feature map (features); default auto: logits "
                        "for recognizers and classifiers, features for detectors")
    p.add_argument("--frame-stride", type=int, default=4,
                   help="frames between the frames of a training clip (default 4, as jobs "
                        "decode; use the stride the model will see: 1 for the benchmark's "
                        "16-frame clips)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run)


def _check_args(args) -> tuple[Path, list[Path], dict]:
    problems = []
    data = Path(args.data)
    videos = []
    if not data.is_dir():
        problems.append(f"--data {data}: not a folder")
    elif args.labels:
        from pipeline.training_data import DatasetError, dataset_meta

        try:
            dataset_meta(data)
        except DatasetError as exc:
            problems.append(f"--data {data} with --labels: {exc}")
    else:
        videos = sorted(p for p in data.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            problems.append(f"--data {data}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        problems.append(f"--out {out}: must end in .safetensors")
    elif not out.parent.is_dir():
        problems.append(f"--out {out}: folder {out.parent} does not exist")
    for name in ("steps", "batch", "frame_stride"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.settle <= 1.0:
        problems.append("--settle must be in [0, 1]")
    if args.threads < 0:
        problems.append("--threads must be 0 or more")
    if args.zoo_dir is not None:
        if not Path(args.zoo_dir).is_dir():
            problems.append(f"--zoo-dir {args.zoo_dir}: not a folder")
        if args.checkpoint or args.option:
            problems.append("--zoo-dir names a zoo model, which takes no --checkpoint or "
                            "--option")
    spec = {}
    if args.dense_blocks is not None:
        spec["dense_blocks"] = args.dense_blocks
    if args.keep_ratios:
        try:
            spec["keep_ratios"] = [float(v) for v in args.keep_ratios.split(",")]
        except ValueError:
            problems.append(f"--keep-ratios {args.keep_ratios!r}: expected numbers, e.g. 0.7,0.5")
    if problems:
        raise UserError("\n  ".join(["bad arguments:"] + problems))
    return out, videos, spec


class LabelledSamples:
    """Endless random labelled training batches of a generated task folder's train split,
    as ``vidprune train`` makes them (``labels`` for ``train_gates``: class ids, or
    (boxes, classes) for detection)."""

    def __init__(self, task: str, root: Path, prep, seed: int):
        from pipeline.training_data import load_detection_frames, load_recognition_clips

        self.task, self.prep, self.seed = task, prep, seed
        if task == "detection":
            self.data = load_detection_frames(root, "train")
            self.items = len(self.data.frames)
        else:
            self.data = load_recognition_clips(root, "train")
            self.items = len(self.data.labels)
        if not self.items:
            raise UserError(f"--data {root}: the train split has no videos")

    def batches(self, batch: int):
        import numpy as np

        from .train import labelled_batch

        step = 0
        while True:
            step += 1
            out = labelled_batch(self.task, self.data, self.prep, batch,
                                 np.random.default_rng([self.seed, step]))
            yield (out[0], (out[1], out[2])) if self.task == "detection" else out


class VideoClips:
    """Endless random training samples from a folder of videos, preprocessed as the runner
    does: clips of ``frames`` frames (``stride`` apart) or single frames (``frames`` = 1).
    Videos that cannot be decoded are dropped with a warning."""

    def __init__(self, paths: list[Path], frames: int, stride: int, preprocess, seed: int):
        import decord

        self.frames, self.stride, self.preprocess = frames, stride, preprocess
        self.rng = random.Random(seed)
        self.readers = []
        for path in paths:
            try:
                reader = decord.VideoReader(str(path), num_threads=1)
                if len(reader):
                    self.readers.append((path, reader))
            except Exception as exc:  # decord raises its own error types
                print(f"warning: skipping {path.name}: {str(exc).splitlines()[0]}",
                      file=sys.stderr)
        span = (frames - 1) * stride + 1
        short = sum(len(r) < span for _, r in self.readers)
        if frames > 1 and short:
            # the clips would end in a still picture: gates trained on motion that stops
            print(f"warning: {short} of {len(self.readers)} videos are shorter than a clip "
                  f"({frames} frames {stride} apart = {span} frames); their clips repeat the "
                  f"last frame (lower --frame-stride?)", file=sys.stderr)

    def sample(self):
        import torch

        while self.readers:
            i = self.rng.randrange(len(self.readers))
            path, reader = self.readers[i]
            span = (self.frames - 1) * self.stride + 1
            start = self.rng.randrange(max(1, len(reader) - span + 1))
            # short videos repeat their last frame, as the runner does for a short stream
            idx = [min(start + k * self.stride, len(reader) - 1) for k in range(self.frames)]
            try:
                frames = reader.get_batch(idx).asnumpy()
            except Exception as exc:
                print(f"warning: dropping {path.name}: {str(exc).splitlines()[0]}",
                      file=sys.stderr)
                self.readers.pop(i)
                continue
            prepped = [self.preprocess(f) for f in frames]
            return torch.stack(prepped, dim=1) if self.frames > 1 else prepped[0]
        raise UserError("no video in --data could be decoded")

    def batches(self, batch: int):
        import torch

        while True:
            yield torch.stack([self.sample() for _ in range(batch)]), None


def run(args) -> int:
    out, videos, spec = _check_args(args)
    options = parse_key_values(args.option)

    import torch
    from safetensors.torch import save_file

    from models import ModelError, build_method, build_model
    from models.checkpoints import CheckpointError
    from models.methods.svit import attach_gates, gates_of
    from models.registry import build_zoo_model, describe, zoo_entries
    from models.runner import StreamRunner
    from models.svit_training import GateTraining, distill_mode, measure_keep, train_gates

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.zoo_dir is not None:
            model = build_zoo_model(args.model, args.zoo_dir)
        else:
            model = build_model(args.model, checkpoint=args.checkpoint, **options)
    except (ModelError, CheckpointError) as exc:
        raise UserError(str(exc)) from None
    base = describe(model)
    # a zoo model that has gates goes on training them: its card's history is kept
    previous = zoo_entries(args.zoo_dir).get(base) if hasattr(model, "zoo_name") else None
    previous_training = (previous.card.get("svit_training")
                         if previous is not None and gates_of(model.backbone) is not None
                         else None)
    origin = previous.card.get("base_model", base) if previous_training else base
    if gates_of(model.backbone) is None:
        try:
            attach_gates(model, spec)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    elif spec:
        raise UserError(f"{base} already has gates; --dense-blocks/--keep-ratios apply only to "
                        f"a model without them")
    gates = gates_of(model.backbone)

    prep = StreamRunner(model, build_method("none"))
    if model.kind == "clip" or hasattr(model, "forward_temporal"):
        frames, preprocess = model.clip_frames, prep.preprocess_recognition
    elif model.task == "detection":
        frames, preprocess = 1, lambda f: prep.preprocess_detection(f)[0]
    else:
        frames, preprocess = 1, prep.preprocess_recognition
    if args.labels:
        from pipeline.training_data import dataset_meta

        meta = dataset_meta(args.data)
        task = meta.get("task")
        if task != model.task:
            raise UserError(f"--data {args.data} holds {task} data; {base} is a "
                            f"{model.task} model")
        if len(meta["classes"]) != len(model.class_names):
            raise UserError(f"--data {args.data} has {len(meta['classes'])} classes; {base} "
                            f"predicts {len(model.class_names)}")
        source = LabelledSamples(task, Path(args.data), prep, args.seed)
        n_data = source.items
        data_note = f"{n_data} labelled training items from {Path(args.data).name}"
    else:
        source = VideoClips(videos, frames, args.frame_stride, preprocess, args.seed)
        n_data = len(source.readers)
        data_note = f"{n_data} videos from {Path(args.data).name}"

    print(f"training SViT gates of {base}: {len(gates.gates)} gated blocks after "
          f"{gates.dense_blocks} dense, keep targets {gates.keep_ratios}; "
          f"{data_note}, {args.steps} steps of {args.batch}", file=sys.stderr)
    started = time.monotonic()
    every = max(1, args.steps // 20)

    def progress(rec) -> None:
        if rec.step % every == 0 or rec.step == args.steps:
            keep = " ".join(f"{k:.2f}" for k in rec.keep)
            print(f"step {rec.step}/{args.steps}  loss {rec.loss:.4f}  {task_name} "
                  f"{rec.task_loss:.4f}  ratio {rec.ratio_loss:.4f}  keep [{keep}]  "
                  f"noise {rec.noise:.2f}  "
                  f"{time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)

    task_name = "task" if args.labels else "distill"
    config = GateTraining(steps=args.steps, lr=args.lr, backbone_lr=args.backbone_lr,
                          distill=args.distill, settle=args.settle,
                          schedule=args.schedule)
    try:
        mode = distill_mode(model, config)
    except ValueError as exc:
        raise UserError(f"--distill: {exc}") from None
    history = train_gates(model, source.batches(args.batch), config, on_step=progress)
    measured = measure_keep(model, next(source.batches(args.batch))[0])

    card = {
        "arch": model.arch.name,
        "options": model.build_options,
        "class_names": list(model.class_names),
        "description": f"{origin} with SViT token gates (run with pruning.method: svit)",
        "base_model": origin,
        "svit_training": {
            "steps": len(history), "batch": args.batch, "lr": args.lr,
            "backbone_lr": args.backbone_lr, "labels": args.labels,
            "schedule": args.schedule, "settle": args.settle, "seed": args.seed,
            "frame_stride": None if args.labels else args.frame_stride,
            "loss": (("task loss on labels (" + ("CenterNet" if model.task == "detection"
                                                 else "cross-entropy") + ")")
                     if args.labels else
                     "distillation to the dense model ("
                     + ("cross-entropy against its class probabilities" if mode == "logits"
                        else "MSE of the final backbone map") + ")")
            + f" + {config.ratio_weight:g} x sum of (mean keep - target)^2"
            + f" (Gumbel-softmax tau {config.tau:g})",
            "data": data_note,
            "final_loss": history[-1].loss if history else None,
            "final_keep_training": history[-1].keep if history else None,
            "keep_targets": gates.keep_ratios,
            "keep_fraction_measured": measured.fraction,
            "keep_probability_measured": measured.probability,
        },
    }
    if previous_training:
        card["svit_training"]["continued_from"] = {"model": base,
                                                   "svit_training": previous_training}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    card_path = out.with_suffix(".json")
    tmp_weights = out.with_name(out.name + ".tmp")
    tmp_card = card_path.with_name(card_path.name + ".tmp")
    try:
        save_file(state, str(tmp_weights))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_weights, 0o666 & ~umask)  # safetensors creates its file owner-only
        tmp_card.write_text(json.dumps(card, indent=2) + "\n")
        os.replace(tmp_weights, out)
        os.replace(tmp_card, card_path)
    finally:
        for tmp in (tmp_weights, tmp_card):
            tmp.unlink(missing_ok=True)
    print(f"wrote {out} and {card_path} (keep fraction measured "
          f"{[round(v, 3) for v in measured.fraction]})", file=sys.stderr)
    return 0
