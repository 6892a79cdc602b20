"""Named architectures and the model zoo.

An *architecture* is a recipe (``vitdet-b``, ``videomae-b`` ...) that builds a randomly
initialised model; a *zoo entry* is an architecture plus the trained weights shipped in
``models/zoo/`` (``<name>.safetensors`` with ``<name>.json``: the recipe, class names and the
model card). Job specs name either a zoo entry, or an architecture plus a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .detector import ViTDetector
from .heads import CenterNetHead, SimpleFeaturePyramid
from .recognizers import VideoMAERecognizer, ViViTRecognizer
from .vit import plain_vit, videomae_backbone, vitdet_backbone

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


class ModelError(ValueError):
    """Unknown model or architecture, or weights that do not fit it."""


@dataclass(frozen=True)
class Arch:
    name: str
    family: str                 # vitdet | vit | videomae | vivit
    size: str                   # ti | s | b | l
    task: str                   # detection | recognition | classification
    input_size: int             # default input resolution (pixels, square)
    options: dict[str, Any] = field(default_factory=dict)


def _archs() -> dict[str, Arch]:
    out: dict[str, Arch] = {}
    for size in ("ti", "s", "b", "l"):
        out[f"vitdet-{size}"] = Arch(f"vitdet-{size}", "vitdet", size, "detection", 1024,
                                     {"head": "centernet"})
        out[f"vit-{size}"] = Arch(f"vit-{size}", "vit", size, "classification", 224)
        out[f"videomae-{size}"] = Arch(f"videomae-{size}", "videomae", size, "recognition", 224)
        out[f"vivit-{size}"] = Arch(f"vivit-{size}", "vivit", size, "recognition", 224)
    for size in ("b", "l"):
        out[f"vitdet-{size}-rcnn"] = Arch(f"vitdet-{size}-rcnn", "vitdet", size, "detection",
                                          1024, {"head": "rcnn"})
    return out


ARCHS: dict[str, Arch] = _archs()

_DEFAULT_CLASSES = {"detection": 80, "recognition": 400, "classification": 1000}

#: What each architecture option must be, checked before any is used (options come from job
#: specs and --option flags: a wrong type must say which option, not fail deep in a layer).
_INT_OPTIONS = ("depth", "dim", "heads", "input_size", "window", "neck_channels", "clip_frames",
                "temporal_depth", "tubelet")
_NUMBER_LIST_OPTIONS = ("neck_scales", "pretrain_grid", "global_blocks")
_TEXT_OPTIONS = ("head", "head_level")
_MAPPING_OPTIONS = ("rcnn", "svit")


def _check_options(name: str, options: dict[str, Any]) -> None:
    def number(v: Any, whole: bool) -> bool:
        return not isinstance(v, bool) and (isinstance(v, int) or (not whole and
                                                                   isinstance(v, float)))

    problems = []
    for key, value in options.items():
        if key in _INT_OPTIONS and not (number(value, True) and value > 0):
            problems.append(f"{key} must be a positive integer, got {value!r}")
        elif key in _NUMBER_LIST_OPTIONS and value is not None and not (
                isinstance(value, (list, tuple)) and all(number(v, False) for v in value)):
            problems.append(f"{key} must be a list of numbers, got {value!r}")
        elif key in _TEXT_OPTIONS and not isinstance(value, str):
            problems.append(f"{key} must be text, got {value!r}")
        elif key in _MAPPING_OPTIONS and value is not None and not isinstance(value, dict):
            problems.append(f"{key} must be a mapping, got {value!r}")
    if problems:
        raise ModelError(f"bad options for {name}: {'; '.join(problems)}")


def build_arch(name: str, num_classes: int | None = None, class_names: list[str] | None = None,
               **options: Any) -> nn.Module:
    """A randomly initialised model of architecture ``name``.

    ``options`` override the recipe: ``depth``, ``dim``, ``heads``, ``input_size``,
    ``window``, ``neck_scales``, ``neck_channels``, ``head_level``, ``clip_frames``,
    ``temporal_depth``, ``tubelet`` (ViViT), ``rcnn`` (a dict of R-CNN head settings),
    ``pretrain_grid``. ``svit`` (``{"dense_blocks": .., "keep_ratios": [..]}``) adds SViT
    gates to the backbone (``models/methods/svit.py``), for checkpoints and zoo entries that
    ship trained gates.
    """
    try:
        arch = ARCHS[name]
    except KeyError:
        raise ModelError(f"unknown architecture {name!r}; available: {', '.join(sorted(ARCHS))}"
                         ) from None
    _check_options(name, options)
    opts = {**arch.options, **options}
    if class_names is not None:
        num_classes = len(class_names)
    num_classes = num_classes or _DEFAULT_CLASSES[arch.task]
    class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    input_size = int(opts.pop("input_size", arch.input_size))
    svit = opts.pop("svit", None)  # trained SViT gates shipped with the weights
    dims = {k: opts.pop(k) for k in ("depth", "dim", "heads") if k in opts}
    pretrain = tuple(opts.pop("pretrain_grid", (14, 14)))

    if arch.family == "vitdet":
        backbone = vitdet_backbone(arch.size, img_size=input_size, window=opts.pop("window", 14),
                                   pretrain_grid=pretrain,
                                   global_blocks=opts.pop("global_blocks", None), **dims)
        head_kind = opts.pop("head", "centernet")
        if head_kind == "centernet":
            scales = tuple(opts.pop("neck_scales", (2.0,)))
            channels = int(opts.pop("neck_channels", 256))
            neck = SimpleFeaturePyramid(backbone.dim, channels, scales)
            level = opts.pop("head_level", f"p{neck.strides[0].bit_length() - 1}")
            head = CenterNetHead(channels, num_classes, level=level)
        elif head_kind == "rcnn":
            from .rcnn import build_rcnn_head  # the detectron2 two-stage port

            channels = int(opts.pop("neck_channels", 256))
            neck = SimpleFeaturePyramid(backbone.dim, channels, (4.0, 2.0, 1.0, 0.5))
            head = build_rcnn_head(num_classes, **{**opts.pop("rcnn", {}), "in_channels": channels})
        else:
            raise ModelError(f"unknown detection head {head_kind!r}")
        model: nn.Module = ViTDetector(backbone, neck, head, class_names)
    elif arch.family == "vit":
        from .classifier import ViTClassifier

        grid = pretrain if "pretrain_grid" in options else (input_size // 16,) * 2
        model = ViTClassifier(plain_vit(arch.size, img_size=input_size, pretrain_grid=grid,
                                        **dims), num_classes, class_names)
    elif arch.family == "videomae":
        backbone = videomae_backbone(arch.size, pretrain_grid=(input_size // 16,) * 2, **dims)
        model = VideoMAERecognizer(backbone, num_classes, class_names,
                                   clip_frames=int(opts.pop("clip_frames", 16)))
    elif arch.family == "vivit":
        tubelet = int(opts.pop("tubelet", 1))  # frames per time step (published ViViT-B: 2)
        spatial = plain_vit(arch.size, img_size=input_size, in_chans=3 * tubelet, **dims)
        model = ViViTRecognizer(spatial, int(opts.pop("temporal_depth", 4)), num_classes,
                                class_names, clip_frames=int(opts.pop("clip_frames", 32)),
                                tubelet=tubelet)
    else:  # pragma: no cover - the table above is closed
        raise ModelError(f"unknown family {arch.family!r}")
    if opts:
        raise ModelError(f"unknown options for {name}: {', '.join(sorted(opts))}")
    if svit is not None:
        from .methods.svit import attach_gates

        try:
            attach_gates(model, svit)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"bad svit gate options for {name}: {exc}") from None
    model.arch = arch
    model.input_size = input_size
    model.build_options = {**options, "input_size": input_size}
    return model


# --- zoo -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch: str
    options: dict[str, Any]
    class_names: list[str]
    weights: Path
    card: dict[str, Any]

    def identity(self) -> str:
        """What names this model in a job's fingerprint: a hash of its weights' bytes and of
        the card without the fields that only document it (:data:`CARD_DOCUMENTATION`), so a
        reworded card or a metric measured again leaves every job's fingerprint, and so its
        resume, alone. A field not known to be documentation counts."""
        card = {k: v for k, v in self.card.items() if k not in CARD_DOCUMENTATION}
        if isinstance(card.get("pruning"), dict):
            card["pruning"] = {k: v for k, v in card["pruning"].items() if k != "chosen_on"}
        digest = hashlib.sha256()
        digest.update(json.dumps(card, sort_keys=True).encode())
        with open(self.weights, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return f"zoo:{digest.hexdigest()[:16]}"


#: Card fields that say how a zoo model was trained, measured and chosen, not how it runs
#: (``pruning.chosen_on`` too): they may change without changing one output.
CARD_DOCUMENTATION = ("description", "base_model", "model_card", "svit_training")


def zoo_entries(zoo_dir: str | Path | None = None) -> dict[str, ZooEntry]:
    """Every model shipped in ``models/zoo`` (a ``.json`` card beside its ``.safetensors``),
    or in ``zoo_dir`` (a freshly trained model not shipped yet)."""
    out = {}
    for card_path in sorted(Path(zoo_dir or ZOO_DIR).glob("*.json")):
        card = json.loads(card_path.read_text())
        name = card_path.stem
        out[name] = ZooEntry(name, card["arch"], card.get("options", {}), card["class_names"],
                             card_path.with_suffix(".safetensors"), card)
    return out


def build_zoo_model(name: str, zoo_dir: str | Path | None = None) -> nn.Module:
    """A zoo model with its trained weights (from ``models/zoo`` or ``zoo_dir``)."""
    entries = zoo_entries(zoo_dir)
    if name not in entries:
        avail = ", ".join(sorted(entries)) or "(none shipped)"
        raise ModelError(f"unknown zoo model {name!r}; available: {avail}")
    entry = entries[name]
    from .checkpoints import load_file

    model = build_arch(entry.arch, class_names=entry.class_names, **entry.options)
    state = load_file(entry.weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"zoo weights {entry.weights.name} do not fit {entry.arch}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.zoo_name = name
    return model.eval()


def describe(model: nn.Module) -> str:
    return getattr(model, "zoo_name", None) or model.arch.name


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def to_device(model: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    return model.to(device=device, dtype=dtype)
