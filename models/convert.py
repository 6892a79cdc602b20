"""Converters from foreign checkpoint layouts to vidprune's key names.

Each converter recognises its format from key names and returns a state dict for a model built
by :func:`models.registry.build_arch`; ``convert_for`` picks the first that recognises the
state, and a state dict already in vidprune's own layout passes through unchanged. Keys a
converter does not know are passed through untouched, so that loading lists them as
unexpected. Keys of parts vidprune does not have (a mask head, EPIC-Kitchens' noun head) are
dropped and reported in the :class:`Conversion`.

Where each layout comes from (key names and shapes as in those sources):

- ``detectron2-vitdet``: detectron2 ``modeling/backbone/vit.py`` (``ViT``,
  ``SimpleFeaturePyramid``, keys under ``backbone.net.`` and ``backbone.simfp_<k>.``),
  ``modeling/proposal_generator/rpn.py`` (``StandardRPNHead``), ``roi_heads/box_head.py``
  (``FastRCNNConvFCHead``) and ``roi_heads/fast_rcnn.py`` (``FastRCNNOutputLayers``); the
  published ViTDet checkpoints and the ImageNet VID checkpoint the Eventful Transformers
  authors distribute (``frcnn_vitdet_final.pth``, trained with detectron2_vitdet_vid) use it.
- ``eventful-vitdet``: what the Eventful Transformers code (WISION-Lab/eventful-transformer,
  ``scripts/convert/vitdet.py`` with ``configs/convert/vitdet_b.txt``, ``models/vitdet.py``)
  makes of a detectron2 checkpoint: ``embedding.conv``, ``backbone.blocks.<i>.qkv`` ...,
  ``pyramid.stages.<s>.<i>``; RPN and RoI heads keep detectron2's names.
- ``videomae``: MCG-NJU/VideoMAE ``modeling_finetune.py`` (``VisionTransformer``): Conv3d
  ``patch_embed.proj``, ``attn.q_bias``/``attn.v_bias`` and no k bias, optional layer scale
  ``gamma_1``/``gamma_2``, ``fc_norm``, ``head``; fine-tuned weights sit under ``module``.
- ``timm-vit``: timm ``models/vision_transformer.py`` and DeiT (``cls_token``, ``pos_embed``
  with a class slot, ``blocks.<i>.attn.qkv``, optional ``ls1.gamma``/``ls2.gamma``, ``norm``,
  ``head``); DeiT checkpoints sit under ``model``.
- ``vivit-factorised``: alibaba-mmai-research/TAdaConv ``models/base/transformer.py``
  (``FactorizedTransformer``: ``backbone.stem.conv1`` tubelet Conv3d, ``backbone.pos_embd``,
  ``backbone.layers.<i>`` with ``norm``, ``attn.to_qkv``, ``attn.proj``, ``norm_ffn``,
  ``ffn.net.0``/``ffn.net.3``, ``backbone.norm``, ``backbone.cls_token_out``,
  ``backbone.temp_embd``, ``backbone.layers_temporal.<i>``, ``backbone.norm_out``) with the
  head ``head.linear`` (Kinetics) or ``head.linear1``/``head.linear2`` (EPIC-Kitchens verbs and
  nouns); ``.pyth`` files with the weights under ``model_state``. These are the "ViViT Fact.
  Enc." weights the Eventful Transformers authors use.
- ``eventful-vivit``: the Eventful Transformers code's own ViViT layout (``models/vivit.py``,
  ``configs/convert/vivit_b.txt``): ``spatial_model.*``, ``temporal_model.*``, ``classifier``;
  its fine-tuned temporal models are saved this way.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import resize_pos_embed

log = logging.getLogger(__name__)


@dataclass
class Conversion:
    """What a converter did: the state dict for the model, and what it left out or changed."""

    format: str
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)   # keys of parts vidprune does not have
    notes: list[str] = field(default_factory=list)
    #: preprocessing the checkpoint was trained with, when the format implies it
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None


Converter = Callable[[nn.Module, dict[str, torch.Tensor], Conversion], dict[str, torch.Tensor]]

#: (name, detector, converter): detector(state) tells whether the state is in that format.
CONVERTERS: list[tuple[str, Callable[[dict[str, torch.Tensor]], bool], Converter]] = []


def register(name: str, detect: Callable[[dict[str, torch.Tensor]], bool]):
    def wrap(fn: Converter) -> Converter:
        CONVERTERS.append((name, detect, fn))
        return fn
    return wrap


def detect_format(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = set(model.state_dict())
    if set(state) <= own or own <= set(state):
        return "native"
    for name, detect, _ in CONVERTERS:
        if detect(state):
            return name
    return "native"  # unknown: loading will list the keys that do not fit


def convert(model: nn.Module, state: dict[str, torch.Tensor]) -> Conversion:
    """The state dict converted for ``model``, with a record of what was done."""
    fmt = detect_format(model, state)
    conv = Conversion(fmt, dict(state))
    for name, _detect, fn in CONVERTERS:
        if name == fmt:
            conv.state = fn(model, dict(state), conv)
    if conv.dropped:
        log.warning("%d checkpoint keys dropped, %s has no such parts: %s", len(conv.dropped),
                    type(model).__name__, ", ".join(conv.dropped))
    return conv


def convert_for(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert(model, state).state


# --- shared pieces -------------------------------------------------------------------------

def first_rule(text: str, rules: list[tuple[str, str]]) -> str:
    """``text`` rewritten by the first ``(regex, replacement)`` rule that matches, if any."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, text)
        if n:
            return new
    return text


def rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply the first matching rule to every key; keys no rule matches are kept as they are
    (they show up as unexpected when loading)."""
    return {first_rule(key, rules): value for key, value in state.items()}


def own_shape(model: nn.Module, key: str) -> tuple[int, ...] | None:
    t = model.state_dict().get(key)
    return None if t is None else tuple(t.shape)


def fit_pos_embed(model: nn.Module, key: str, pos: torch.Tensor, conv: Conversion,
                  source_prefix: int | None = None) -> torch.Tensor:
    """A learned grid table (1, P + H*W, D) made to fit ``model``'s ``key``: a class slot the
    model does not have is dropped (detectron2 keeps one from pre-training), and a grid of
    another size is resized bicubically (as detectron2 and timm do when sizes differ)."""
    want = own_shape(model, key)
    if want is None or tuple(pos.shape) == want:
        return pos
    backbone = model.get_submodule(key.rsplit(".", 1)[0])
    n = pos.shape[1]
    if source_prefix is None:  # a square count has no class slot; square + 1 has one
        source_prefix = 0 if math.isqrt(n) ** 2 == n else 1
    side = math.isqrt(n - source_prefix)
    if side * side != n - source_prefix or source_prefix < backbone.prefix:
        return pos  # not a square grid, or no class slot to keep: loading reports the shape
    grid = pos[:, source_prefix:]
    dst = tuple(backbone.pretrain_grid)
    if (side, side) != dst:
        grid = resize_pos_embed(grid, (side, side), dst)
        conv.notes.append(f"{key}: position grid {side}x{side} resized to {dst[0]}x{dst[1]}")
    if source_prefix > backbone.prefix:
        conv.notes.append(f"{key}: class-token slot of the position table dropped")
    return torch.cat([pos[:, :backbone.prefix], grid], dim=1)


def fit_rel_pos(model: nn.Module, state: dict[str, torch.Tensor], conv: Conversion) -> None:
    """Relative-position tables of another length (a checkpoint trained at another input
    size) resized linearly, as detectron2's ``get_rel_pos`` does at run time."""
    own = model.state_dict()
    for key, table in list(state.items()):
        if not key.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) or key not in own:
            continue
        want = tuple(own[key].shape)
        if tuple(table.shape) == want or table.shape[1] != want[1]:
            continue
        resized = F.interpolate(table.t()[None].float(), size=want[0], mode="linear")[0].t()
        state[key] = resized.to(table.dtype).contiguous()
        conv.notes.append(f"{key}: {table.shape[0]} relative positions resized to {want[0]}")


def fold_layer_scale(state: dict[str, torch.Tensor], gamma_key: str, linear_prefix: str) -> None:
    """Fold a layer-scale vector into the Linear before it: ``gamma * (W x + b)`` is
    ``(gamma W) x + gamma b``, exactly."""
    gamma = state.pop(gamma_key)
    state[f"{linear_prefix}.weight"] = state[f"{linear_prefix}.weight"] * gamma[:, None]
    state[f"{linear_prefix}.bias"] = state[f"{linear_prefix}.bias"] * gamma


def tubelet_kernel(model: nn.Module, key: str, weight: torch.Tensor) -> torch.Tensor:
    """A Conv3d tubelet kernel (D, 3, t, p, p) as the Conv2d of a frame model whose input is
    the t frames of a tubelet stacked channel-major (channel ``c * t + i``): the same sums."""
    want = own_shape(model, key)
    if weight.ndim != 5 or want is None or len(want) != 4:
        return weight
    d, c, t, ph, pw = weight.shape
    return weight.reshape(d, c * t, ph, pw)


def _drop(state: dict[str, torch.Tensor], conv: Conversion, pattern: str) -> None:
    for key in [k for k in state if re.match(pattern, k)]:
        conv.dropped.append(key)
        del state[key]


# --- detectron2 ViTDet --------------------------------------------------------------------

@register("detectron2-vitdet", lambda s: any(k.startswith("backbone.net.") for k in s))
def from_detectron2_vitdet(model: nn.Module, state: dict[str, torch.Tensor],
                           conv: Conversion) -> dict[str, torch.Tensor]:
    _drop(state, conv, r"roi_heads\.(mask_head|keypoint_head)\.")
    for key in ("pixel_mean", "pixel_std"):  # older detectron2 saved them as buffers
        if key in state:
            value = tuple(float(v) for v in state.pop(key).flatten())
            setattr(conv, key, value)
    out = rename(state, [
        (r"^backbone\.net\.", "backbone."),
        (r"^backbone\.simfp_", "neck.simfp_"),
        (r"^proposal_generator\.", "head.proposal_generator."),
        (r"^roi_heads\.", "head.roi_heads."),
    ])
    _fit_vitdet_tables(model, out, conv)
    return out


def _fit_vitdet_tables(model: nn.Module, out: dict[str, torch.Tensor], conv: Conversion) -> None:
    if "backbone.pos_embed" in out:
        out["backbone.pos_embed"] = fit_pos_embed(model, "backbone.pos_embed",
                                                  out["backbone.pos_embed"], conv)
    fit_rel_pos(model, out, conv)


# --- the Eventful Transformers code's own layouts ------------------------------------------

#: Block parts: Eventful's ``blocks.py`` names -> timm / detectron2 names.
EVENTFUL_BLOCK_RULES = [
    (r"\.input_layer_norm\.", ".norm1."),
    (r"\.qkv\.", ".attn.qkv."),
    (r"\.projection\.", ".attn.proj."),
    (r"\.relative_position\.y_embedding$", ".attn.rel_pos_h"),
    (r"\.relative_position\.x_embedding$", ".attn.rel_pos_w"),
    (r"\.mlp_layer_norm\.", ".norm2."),
    (r"\.mlp_1\.", ".mlp.fc1."),
    (r"\.mlp_2\.", ".mlp.fc2."),
]

#: Leading layers of each SimplePyramid stage before its conv-norm-conv-norm tail, by scale
#: (Eventful's ``models/vitdet.py``: deconv, norm, GELU, deconv / deconv / none / max-pool).
_PYRAMID_LEAD = {4.0: 4, 2.0: 1, 1.0: 0, 0.5: 1}


def _eventful_blocks(key: str, prefix: str, target: str) -> str:
    """``<prefix>blocks.<i>.<eventful part>`` -> ``<target>.<i>.<our part>``."""
    m = re.match(rf"^{re.escape(prefix)}blocks\.(\d+)(\..*)$", key)
    if not m:
        return key
    return f"{target}.{m.group(1)}{first_rule(m.group(2), EVENTFUL_BLOCK_RULES)}"


@register("eventful-vitdet", lambda s: "embedding.conv.weight" in s
          and any(k.startswith("pyramid.stages.") for k in s))
def from_eventful_vitdet(model: nn.Module, state: dict[str, torch.Tensor],
                         conv: Conversion) -> dict[str, torch.Tensor]:
    scales = list(getattr(getattr(model, "neck", None), "scales", (4.0, 2.0, 1.0, 0.5)))
    out = {}
    for key, value in state.items():
        new = _eventful_blocks(key, "backbone.", "backbone.blocks")
        if key.startswith("embedding.conv."):
            new = "backbone.patch_embed.proj." + key[len("embedding.conv."):]
        elif key == "backbone.position_encoding.encoding":
            new = "backbone.pos_embed"
        elif key.startswith("pyramid.stages."):
            new = _eventful_pyramid_key(key, scales)
        elif key.startswith(("proposal_generator.", "roi_heads.")):
            new = "head." + key
        out[new] = value
    _drop(out, conv, r"head\.roi_heads\.(mask_head|keypoint_head)\.")
    _fit_vitdet_tables(model, out, conv)
    return out


def _eventful_pyramid_key(key: str, scales: list[float]) -> str:
    m = re.match(r"^pyramid\.stages\.(\d+)\.(\d+)\.(.*)$", key)
    if not m or int(m.group(1)) >= len(scales):
        return key
    scale = float(scales[int(m.group(1))])
    if scale not in _PYRAMID_LEAD:
        return key
    lead, i, param = _PYRAMID_LEAD[scale], int(m.group(2)), m.group(3)
    level = int(math.log2(16 / scale))  # stride 16 / scale: simfp_2 .. simfp_5
    if i < lead:
        return f"neck.simfp_{level}.{i}.{param}"
    tail = i - lead  # conv, norm, conv, norm -> detectron2's conv(+norm), conv(+norm)
    layer = lead + tail // 2
    return f"neck.simfp_{level}.{layer}.{'norm.' if tail % 2 else ''}{param}"


@register("eventful-vivit", lambda s: "spatial_model.class_token" in s)
def from_eventful_vivit(model: nn.Module, state: dict[str, torch.Tensor],
                        conv: Conversion) -> dict[str, torch.Tensor]:
    fixed = {
        "embedding.conv.weight": "backbone.patch_embed.proj.weight",
        "embedding.conv.bias": "backbone.patch_embed.proj.bias",
        "spatial_model.class_token": "backbone.cls_token",
        "spatial_model.backbone.position_encoding.encoding": "backbone.pos_embed",
        "temporal_model.class_token": "temporal_cls",
        "temporal_model.backbone.position_encoding.encoding": "temporal_pos",
    }
    out = {}
    for key, value in state.items():
        new = fixed.get(key, key)
        new = _eventful_blocks(new, "spatial_model.backbone.", "backbone.blocks")
        new = _eventful_blocks(new, "temporal_model.backbone.", "temporal")
        out[first_rule(new, [(r"^spatial_model\.layer_norm\.", "backbone.norm."),
                             (r"^temporal_model\.layer_norm\.", "temporal_norm."),
                             (r"^classifier\.", "head.")])] = value
    _vivit_common(model, out, conv)
    return out


# --- ViViT, factorised encoder (TAdaConv layout) ------------------------------------------

#: Block parts: TAdaConv's ``BaseTransformerLayer`` names -> timm names.
TADACONV_BLOCK_RULES = [
    (r"^\.norm\.", ".norm1."),
    (r"^\.attn\.to_qkv\.", ".attn.qkv."),
    (r"^\.norm_ffn\.", ".norm2."),
    (r"^\.ffn\.net\.0\.", ".mlp.fc1."),   # Linear, GELU, Dropout, Linear: net.0 and net.3
    (r"^\.ffn\.net\.3\.", ".mlp.fc2."),
]


@register("vivit-factorised", lambda s: "backbone.stem.conv1.weight" in s
          and any(k.startswith("backbone.layers_temporal.") for k in s))
def from_vivit_factorised(model: nn.Module, state: dict[str, torch.Tensor],
                          conv: Conversion) -> dict[str, torch.Tensor]:
    _drop(state, conv, r"head\.linear2\.")  # EPIC-Kitchens nouns: the Eventful code drops them
    fixed = {
        "backbone.stem.conv1.weight": "backbone.patch_embed.proj.weight",
        "backbone.stem.conv1.bias": "backbone.patch_embed.proj.bias",
        "backbone.cls_token": "backbone.cls_token",
        "backbone.pos_embd": "backbone.pos_embed",
        "backbone.cls_token_out": "temporal_cls",
        "backbone.temp_embd": "temporal_pos",
    }
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        m = re.match(r"^backbone\.(layers|layers_temporal)\.(\d+)(\..*)$", key)
        if m:
            target = "backbone.blocks" if m.group(1) == "layers" else "temporal"
            out[f"{target}.{m.group(2)}{first_rule(m.group(3), TADACONV_BLOCK_RULES)}"] = value
            continue
        # backbone.norm.* keeps its name (the spatial model's final norm)
        out[first_rule(key, [(r"^backbone\.norm_out\.", "temporal_norm."),
                             (r"^head\.linear1?\.", "head.")])] = value
    _vivit_common(model, out, conv)
    return out


def _vivit_common(model: nn.Module, out: dict[str, torch.Tensor], conv: Conversion) -> None:
    key = "backbone.patch_embed.proj.weight"
    if key in out:
        w = out[key]
        want = own_shape(model, key)
        frame_model = want is not None and len(want) == 4
        if w.ndim == 5 and frame_model and w.shape[1] * w.shape[2] != want[1]:
            t, model_t = w.shape[2], want[1] // w.shape[1]
            raise _shape_error(f"the checkpoint embeds tubelets of {t} frames but the model "
                               f"takes {model_t}; build it with tubelet={t}")
        out[key] = tubelet_kernel(model, key, w)
    if "backbone.pos_embed" in out:
        out["backbone.pos_embed"] = fit_pos_embed(model, "backbone.pos_embed",
                                                  out["backbone.pos_embed"], conv,
                                                  source_prefix=1)
    # TAdaConv's and the Eventful code's ViViT configs: mean 0.45, std 0.225 on [0, 1] pixels
    conv.pixel_mean = (0.45 * 255,) * 3
    conv.pixel_std = (0.225 * 255,) * 3


def _shape_error(message: str) -> Exception:
    from .checkpoints import CheckpointError

    return CheckpointError(message)


# --- VideoMAE -------------------------------------------------------------------------------

def _is_videomae(state: dict[str, torch.Tensor]) -> bool:
    w = state.get("patch_embed.proj.weight")
    return w is not None and w.ndim == 5


@register("videomae", _is_videomae)
def from_videomae(model: nn.Module, state: dict[str, torch.Tensor],
                  conv: Conversion) -> dict[str, torch.Tensor]:
    blocks = sorted({int(m.group(1)) for k in state
                     if (m := re.match(r"^blocks\.(\d+)\.", k))})
    for i in blocks:
        p = f"blocks.{i}.attn"
        q, v = state.pop(f"{p}.q_bias", None), state.pop(f"{p}.v_bias", None)
        dim = state[f"{p}.qkv.weight"].shape[1] if f"{p}.qkv.weight" in state else None
        if q is not None and v is not None:
            # VideoMAE learns q and v biases only; its forward uses (q, 0, v) as the qkv bias
            state[f"{p}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        elif f"{p}.qkv.bias" not in state and dim is not None:
            state[f"{p}.qkv.bias"] = torch.zeros(state[f"{p}.qkv.weight"].shape[0],
                                                 dtype=state[f"{p}.qkv.weight"].dtype)
            conv.notes.append(f"{p}.qkv: no bias in the checkpoint, zeros used")
        if f"blocks.{i}.gamma_1" in state:
            fold_layer_scale(state, f"blocks.{i}.gamma_1", f"blocks.{i}.attn.proj")
            fold_layer_scale(state, f"blocks.{i}.gamma_2", f"blocks.{i}.mlp.fc2")
            if i == blocks[0]:
                conv.notes.append("layer scale (gamma_1, gamma_2) folded into attn.proj, mlp.fc2")
    return rename(state, [(r"^(patch_embed|blocks)\.", r"backbone.\1.")])


# --- timm / DeiT ViT ------------------------------------------------------------------------

def _is_timm_vit(state: dict[str, torch.Tensor]) -> bool:
    w = state.get("patch_embed.proj.weight")
    return w is not None and w.ndim == 4 and "cls_token" in state


@register("timm-vit", _is_timm_vit)
def from_timm_vit(model: nn.Module, state: dict[str, torch.Tensor],
                  conv: Conversion) -> dict[str, torch.Tensor]:
    for key in [k for k in state if k.endswith(".ls1.gamma")]:
        block = key[: -len(".ls1.gamma")]
        fold_layer_scale(state, key, f"{block}.attn.proj")
        fold_layer_scale(state, f"{block}.ls2.gamma", f"{block}.mlp.fc2")
    out = rename(state, [(r"^(cls_token|pos_embed|patch_embed\.|blocks\.|norm\.)",
                          r"backbone.\1")])
    if "backbone.pos_embed" in out:
        out["backbone.pos_embed"] = fit_pos_embed(model, "backbone.pos_embed",
                                                  out["backbone.pos_embed"], conv,
                                                  source_prefix=1)
    return out
