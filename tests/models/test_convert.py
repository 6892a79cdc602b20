"""Converters from the real checkpoint layouts, on synthetic state dicts with the real key
names and shape formulas (tiny sizes), written out as the frameworks save them.

Key names: detectron2 ViTDet (``modeling/backbone/vit.py``, ``proposal_generator/rpn.py``,
``roi_heads/box_head.py``, ``fast_rcnn.py``, ``mask_head.py``); the Eventful Transformers code's
remapped layout (``configs/convert/vitdet_b.txt``, ``vivit_b.txt``); VideoMAE
``modeling_finetune.py``; timm ``vision_transformer.py`` / DeiT; TAdaConv's
``FactorizedTransformer`` (``models/base/transformer.py``).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.checkpoints import CheckpointError, load_into

D, HEADS, MLP = 32, 2, 128          # tiny ViT: width, heads, MLP width
HEAD_DIM = D // HEADS
G = torch.Generator().manual_seed(0)


def rnd(*shape, scale=0.05):
    return torch.randn(*shape, generator=G) * scale


def norm_params(prefix, dim):
    return {f"{prefix}.weight": 1 + rnd(dim, scale=0.1), f"{prefix}.bias": rnd(dim, scale=0.1)}


def linear_params(prefix, out, inp, bias=True):
    p = {f"{prefix}.weight": rnd(out, inp)}
    if bias:
        p[f"{prefix}.bias"] = rnd(out)
    return p


def block_params(prefix, names, qkv_bias=True):
    """One pre-norm transformer block under a framework's part names."""
    p = {}
    p.update(norm_params(f"{prefix}.{names['norm1']}", D))
    p.update(linear_params(f"{prefix}.{names['qkv']}", 3 * D, D, bias=qkv_bias))
    p.update(linear_params(f"{prefix}.{names['proj']}", D, D))
    p.update(norm_params(f"{prefix}.{names['norm2']}", D))
    p.update(linear_params(f"{prefix}.{names['fc1']}", MLP, D))
    p.update(linear_params(f"{prefix}.{names['fc2']}", D, MLP))
    return p


TIMM_NAMES = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2",
              "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
TADACONV_NAMES = {"norm1": "norm", "qkv": "attn.to_qkv", "proj": "attn.proj",
                  "norm2": "norm_ffn", "fc1": "ffn.net.0", "fc2": "ffn.net.3"}


def ref_block(x, sd, prefix, names, qkv_bias=None, gamma=(None, None)):
    """A plain pre-norm block straight from the checkpoint's tensors."""
    def w(part, kind="weight"):
        return sd[f"{prefix}.{names[part]}.{kind}"]

    b, n, _ = x.shape
    h = F.layer_norm(x, (D,), w("norm1"), w("norm1", "bias"), eps=1e-6)
    bias = qkv_bias if qkv_bias is not None else sd.get(f"{prefix}.{names['qkv']}.bias")
    qkv = F.linear(h, w("qkv"), bias).view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * HEAD_DIM ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    y = F.linear((attn @ v).transpose(1, 2).reshape(b, n, D), w("proj"), w("proj", "bias"))
    x = x + (y if gamma[0] is None else gamma[0] * y)
    h = F.layer_norm(x, (D,), w("norm2"), w("norm2", "bias"), eps=1e-6)
    y = F.linear(F.gelu(F.linear(h, w("fc1"), w("fc1", "bias"))), w("fc2"), w("fc2", "bias"))
    return x + (y if gamma[1] is None else gamma[1] * y)


def save_torch(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# --- timm / DeiT ------------------------------------------------------------------------------

def timm_state(depth=2, grid=2, classes=5, layer_scale=False):
    sd = {"cls_token": rnd(1, 1, D), "pos_embed": rnd(1, 1 + grid * grid, D)}
    sd.update({"patch_embed.proj.weight": rnd(D, 3, 16, 16), "patch_embed.proj.bias": rnd(D)})
    for i in range(depth):
        sd.update(block_params(f"blocks.{i}", TIMM_NAMES))
        if layer_scale:  # DeiT III / timm init_values: LayerScale modules ls1, ls2
            sd[f"blocks.{i}.ls1.gamma"] = rnd(D, scale=0.5)
            sd[f"blocks.{i}.ls2.gamma"] = rnd(D, scale=0.5)
    sd.update(norm_params("norm", D))
    sd.update(linear_params("head", classes, D))
    return sd


def timm_reference(sd, x, depth):
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    for i in range(depth):
        gamma = (sd.get(f"blocks.{i}.ls1.gamma"), sd.get(f"blocks.{i}.ls2.gamma"))
        t = ref_block(t, sd, f"blocks.{i}", TIMM_NAMES, gamma=gamma)
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("layer_scale", [False, True])
def test_timm_deit_round_trip(tmp_path, layer_scale):
    sd = timm_state(layer_scale=layer_scale)
    path = save_torch(tmp_path, "deit.pth", {"model": sd})  # DeiT: weights under "model"
    model = build_model(arch="vit-ti", checkpoint=path, depth=2, dim=D, heads=HEADS,
                        input_size=32, num_classes=5)
    assert model.checkpoint_conversion.format == "timm-vit"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_reference(sd, x, 2), rtol=1e-4, atol=1e-5)


def test_timm_position_grid_is_resized_to_the_model(tmp_path):
    sd = timm_state(grid=2)
    model = build_model(arch="vit-ti", depth=2, dim=D, heads=HEADS, input_size=48, num_classes=5)
    conv = load_into(model, save_torch(tmp_path, "vit.pth", sd))
    pos = model.backbone.pos_embed.detach()
    assert pos.shape == (1, 1 + 9, D)
    torch.testing.assert_close(pos[:, :1], sd["pos_embed"][:, :1])  # class slot kept
    grid = sd["pos_embed"][:, 1:].reshape(1, 2, 2, D).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 9, D))
    assert any("resized" in n for n in conv.notes)


# --- VideoMAE ---------------------------------------------------------------------------------

def videomae_state(depth=2, classes=5, layer_scale=False, qkv_bias=True):
    sd = {"patch_embed.proj.weight": rnd(D, 3, 2, 16, 16), "patch_embed.proj.bias": rnd(D)}
    for i in range(depth):
        sd.update(block_params(f"blocks.{i}", TIMM_NAMES, qkv_bias=False))  # qkv: no bias
        if qkv_bias:  # VideoMAE learns q and v biases, none for k
            sd[f"blocks.{i}.attn.q_bias"] = rnd(D)
            sd[f"blocks.{i}.attn.v_bias"] = rnd(D)
        if layer_scale:
            sd[f"blocks.{i}.gamma_1"] = rnd(D, scale=0.5)
            sd[f"blocks.{i}.gamma_2"] = rnd(D, scale=0.5)
    sd.update(norm_params("fc_norm", D))
    sd.update(linear_params("head", classes, D))
    return sd


def sinusoid_table(n, dim):
    """VideoMAE's get_sinusoid_encoding_table, written out with numpy."""
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)]
                      for pos in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)[None]


def videomae_reference(sd, clips, depth):
    t = F.conv3d(clips, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=(2, 16, 16)).flatten(2).transpose(1, 2)
    t = t + sinusoid_table(t.shape[1], D)
    for i in range(depth):
        q = sd.get(f"blocks.{i}.attn.q_bias")
        bias = None if q is None else torch.cat([q, torch.zeros_like(q),
                                                 sd[f"blocks.{i}.attn.v_bias"]])
        gamma = (sd.get(f"blocks.{i}.gamma_1"), sd.get(f"blocks.{i}.gamma_2"))
        t = ref_block(t, sd, f"blocks.{i}", TIMM_NAMES, qkv_bias=bias, gamma=gamma)
    pooled = F.layer_norm(t.mean(1), (D,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("layer_scale, qkv_bias", [(False, True), (True, True), (False, False)])
def test_videomae_round_trip(tmp_path, layer_scale, qkv_bias):
    sd = videomae_state(layer_scale=layer_scale, qkv_bias=qkv_bias)
    path = save_torch(tmp_path, "videomae.pth", {"module": sd, "epoch": 3})
    model = build_model(arch="videomae-ti", checkpoint=path, depth=2, dim=D, heads=HEADS,
                        input_size=32, clip_frames=4, num_classes=5)
    assert model.checkpoint_conversion.format == "videomae"
    clips = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(clips), videomae_reference(sd, clips, 2),
                                   rtol=1e-4, atol=1e-5)


# --- ViViT, factorised encoder --------------------------------------------------------------

def vivit_state(depth=2, temporal_depth=1, tubelet=2, frames=8, grid=2, heads=None):
    sd = {"backbone.stem.conv1.weight": rnd(D, 3, tubelet, 16, 16),
          "backbone.stem.conv1.bias": rnd(D),
          "backbone.pos_embd": rnd(1, grid * grid + 1, D),
          "backbone.temp_embd": rnd(1, frames // tubelet + 1, D),
          "backbone.cls_token": rnd(1, 1, D), "backbone.cls_token_out": rnd(1, 1, D)}
    for i in range(depth):
        sd.update(block_params(f"backbone.layers.{i}", TADACONV_NAMES))
    sd.update(norm_params("backbone.norm", D))
    for i in range(temporal_depth):
        sd.update(block_params(f"backbone.layers_temporal.{i}", TADACONV_NAMES))
    sd.update(norm_params("backbone.norm_out", D))
    for name, classes in (heads or {"head.linear": 5}).items():
        sd.update(linear_params(name, classes, D))
    return sd


def vivit_reference(sd, clips, depth, temporal_depth, head="head.linear"):
    """TAdaConv's FactorizedTransformer.forward, from the raw tensors."""
    b = len(clips)
    w = sd["backbone.stem.conv1.weight"]
    x = F.conv3d(clips, w, sd["backbone.stem.conv1.bias"], stride=w.shape[2:])  # b, c, t, h, w
    t = x.shape[2]
    x = x.flatten(3).permute(0, 2, 3, 1).reshape(b * t, -1, D)
    x = torch.cat([sd["backbone.cls_token"].expand(b * t, -1, -1), x], 1) + sd["backbone.pos_embd"]
    for i in range(depth):
        x = ref_block(x, sd, f"backbone.layers.{i}", TADACONV_NAMES)
    x = F.layer_norm(x, (D,), sd["backbone.norm.weight"], sd["backbone.norm.bias"], eps=1e-6)
    x = x[:, 0].reshape(b, t, D)
    x = torch.cat([sd["backbone.cls_token_out"].expand(b, -1, -1), x], 1) + sd["backbone.temp_embd"]
    for i in range(temporal_depth):
        x = ref_block(x, sd, f"backbone.layers_temporal.{i}", TADACONV_NAMES)
    x = F.layer_norm(x, (D,), sd["backbone.norm_out.weight"], sd["backbone.norm_out.bias"],
                     eps=1e-6)
    return F.linear(x[:, 0], sd[f"{head}.weight"], sd[f"{head}.bias"])


VIVIT_OPTS = dict(depth=2, temporal_depth=1, dim=D, heads=HEADS, input_size=32, clip_frames=8,
                  pretrain_grid=(2, 2), num_classes=5)


@pytest.mark.parametrize("tubelet", [2, 1])
def test_vivit_factorised_round_trip(tmp_path, tubelet):
    sd = vivit_state(tubelet=tubelet)
    path = save_torch(tmp_path, "vivit.pyth", {"model_state": sd, "epoch": 30,
                                               "cfg": "VIDEO:\n  BACKBONE: ..."})
    model = build_model(arch="vivit-ti", checkpoint=path, tubelet=tubelet, **VIVIT_OPTS)
    assert model.checkpoint_conversion.format == "vivit-factorised"
    assert model.pixel_mean == pytest.approx((0.45 * 255,) * 3)  # TAdaConv's normalisation
    clips = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(clips), vivit_reference(sd, clips, 2, 1),
                                   rtol=1e-4, atol=1e-5)


def test_vivit_epic_kitchens_noun_head_is_dropped_and_reported(tmp_path):
    sd = vivit_state(heads={"head.linear1": 5, "head.linear2": 7})  # verbs, nouns
    model = build_model(arch="vivit-ti", tubelet=2, **VIVIT_OPTS)
    conv = load_into(model, save_torch(tmp_path, "epic.pyth", {"model_state": sd}))
    assert sorted(conv.dropped) == ["head.linear2.bias", "head.linear2.weight"]
    clips = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(clips), vivit_reference(sd, clips, 2, 1, "head.linear1"),
                                   rtol=1e-4, atol=1e-5)


def test_vivit_tubelet_mismatch_is_explained(tmp_path):
    path = save_torch(tmp_path, "vivit.pyth", {"model_state": vivit_state(tubelet=2)})
    with pytest.raises(CheckpointError, match="tubelet=2"):
        build_model(arch="vivit-ti", checkpoint=path, tubelet=1, **VIVIT_OPTS)


def eventful_vivit_from(sd):
    """The Eventful Transformers code's layout for the same weights
    (configs/convert/vivit_b.txt)."""
    parts = {"norm": "input_layer_norm", "attn.to_qkv": "qkv", "attn.proj": "projection",
             "norm_ffn": "mlp_layer_norm", "ffn.net.0": "mlp_1", "ffn.net.3": "mlp_2"}
    out = {"embedding.conv.weight": sd["backbone.stem.conv1.weight"],
           "embedding.conv.bias": sd["backbone.stem.conv1.bias"],
           "spatial_model.class_token": sd["backbone.cls_token"],
           "spatial_model.backbone.position_encoding.encoding": sd["backbone.pos_embd"],
           "temporal_model.class_token": sd["backbone.cls_token_out"],
           "temporal_model.backbone.position_encoding.encoding": sd["backbone.temp_embd"],
           "classifier.weight": sd["head.linear.weight"], "classifier.bias": sd["head.linear.bias"]}
    for key, value in sd.items():
        for src, sub in (("backbone.layers.", "spatial_model"),
                         ("backbone.layers_temporal.", "temporal_model")):
            if key.startswith(src):
                i, rest = key[len(src):].split(".", 1)
                part, kind = rest.rsplit(".", 1)
                out[f"{sub}.backbone.blocks.{i}.{parts[part]}.{kind}"] = value
        if key.startswith("backbone.norm."):
            out["spatial_model.layer_norm." + key.split(".")[-1]] = value
        if key.startswith("backbone.norm_out."):
            out["temporal_model.layer_norm." + key.split(".")[-1]] = value
    return out


def test_eventful_vivit_layout_loads_the_same_weights(tmp_path):
    sd = vivit_state()
    ours = build_model(arch="vivit-ti", tubelet=2, **VIVIT_OPTS)
    conv = load_into(ours, save_torch(tmp_path, "ev.pth", eventful_vivit_from(sd)))
    assert conv.format == "eventful-vivit"
    clips = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(clips), vivit_reference(sd, clips, 2, 1),
                                   rtol=1e-4, atol=1e-5)


# --- detectron2 ViTDet with the Faster R-CNN head --------------------------------------------

NECK, CLASSES, WINDOW, GRID, PRETRAIN = 16, 3, 4, 8, 4   # input 128 px: an 8x8 token grid
GLOBAL_BLOCKS = (1, 3)
VITDET_OPTS = dict(depth=4, dim=D, heads=HEADS, input_size=128, window=WINDOW,
                   global_blocks=GLOBAL_BLOCKS, pretrain_grid=(PRETRAIN, PRETRAIN),
                   neck_channels=NECK, num_classes=CLASSES,
                   rcnn={"box_conv_dims": [NECK] * 4, "box_fc_dims": [32], "pre_nms_topk": 60,
                         "post_nms_topk": 20})


def conv_params(prefix, out, inp, k, bias=True, norm=False):
    p = {f"{prefix}.weight": rnd(out, inp, k, k)}
    if bias:
        p[f"{prefix}.bias"] = rnd(out)
    if norm:  # detectron2 Conv2d(norm=LayerNorm): the norm is a child module ``norm``
        p.update(norm_params(f"{prefix}.norm", out))
    return p


def detectron2_vitdet_state(grid=GRID, mask_head=True):
    sd = {"backbone.net.patch_embed.proj.weight": rnd(D, 3, 16, 16),
          "backbone.net.patch_embed.proj.bias": rnd(D),
          # pre-trained with a class token: 1 + 14 * 14 positions in ViTDet-B (here 1 + 4 * 4)
          "backbone.net.pos_embed": rnd(1, 1 + PRETRAIN * PRETRAIN, D)}
    for i in range(4):
        p = f"backbone.net.blocks.{i}"
        sd.update(block_params(p, TIMM_NAMES))
        size = grid if i in GLOBAL_BLOCKS else WINDOW
        sd[f"{p}.attn.rel_pos_h"] = rnd(2 * size - 1, HEAD_DIM)
        sd[f"{p}.attn.rel_pos_w"] = rnd(2 * size - 1, HEAD_DIM)
    # simple feature pyramid: ConvTranspose2d weights are (in, out, k, k)
    sd.update({"backbone.simfp_2.0.weight": rnd(D, D // 2, 2, 2),
               "backbone.simfp_2.0.bias": rnd(D // 2)})
    sd.update(norm_params("backbone.simfp_2.1", D // 2))
    sd.update({"backbone.simfp_2.3.weight": rnd(D // 2, D // 4, 2, 2),
               "backbone.simfp_2.3.bias": rnd(D // 4)})
    sd.update(conv_params("backbone.simfp_2.4", NECK, D // 4, 1, bias=False, norm=True))
    sd.update(conv_params("backbone.simfp_2.5", NECK, NECK, 3, bias=False, norm=True))
    sd.update({"backbone.simfp_3.0.weight": rnd(D, D // 2, 2, 2),
               "backbone.simfp_3.0.bias": rnd(D // 2)})
    sd.update(conv_params("backbone.simfp_3.1", NECK, D // 2, 1, bias=False, norm=True))
    sd.update(conv_params("backbone.simfp_3.2", NECK, NECK, 3, bias=False, norm=True))
    sd.update(conv_params("backbone.simfp_4.0", NECK, D, 1, bias=False, norm=True))
    sd.update(conv_params("backbone.simfp_4.1", NECK, NECK, 3, bias=False, norm=True))
    sd.update(conv_params("backbone.simfp_5.1", NECK, D, 1, bias=False, norm=True))
    sd.update(conv_params("backbone.simfp_5.2", NECK, NECK, 3, bias=False, norm=True))
    rpn = "proposal_generator.rpn_head"
    sd.update(conv_params(f"{rpn}.conv.conv0", NECK, NECK, 3))
    sd.update(conv_params(f"{rpn}.conv.conv1", NECK, NECK, 3))
    sd.update(conv_params(f"{rpn}.objectness_logits", 3, NECK, 1))
    sd.update(conv_params(f"{rpn}.anchor_deltas", 12, NECK, 1))
    for k in range(1, 5):
        sd.update(conv_params(f"roi_heads.box_head.conv{k}", NECK, NECK, 3, bias=False, norm=True))
    sd.update(linear_params("roi_heads.box_head.fc1", 32, NECK * 7 * 7))
    sd.update(linear_params("roi_heads.box_predictor.cls_score", CLASSES + 1, 32))
    sd.update(linear_params("roi_heads.box_predictor.bbox_pred", 4 * CLASSES, 32))
    if mask_head:  # MaskRCNNConvUpsampleHead
        for k in range(1, 5):
            sd.update(conv_params(f"roi_heads.mask_head.mask_fcn{k}", NECK, NECK, 3, bias=False,
                                  norm=True))
        sd.update({"roi_heads.mask_head.deconv.weight": rnd(NECK, NECK, 2, 2),
                   "roi_heads.mask_head.deconv.bias": rnd(NECK)})
        sd.update(conv_params("roi_heads.mask_head.predictor", CLASSES, NECK, 1))
    return sd


def assign_by_hand(model, sd):
    """Put detectron2's tensors into our modules one by one (an independent mapping)."""
    b, neck, head = model.backbone, model.neck, model.head
    with torch.no_grad():
        b.patch_embed.proj.weight.copy_(sd["backbone.net.patch_embed.proj.weight"])
        b.patch_embed.proj.bias.copy_(sd["backbone.net.patch_embed.proj.bias"])
        b.pos_embed.copy_(sd["backbone.net.pos_embed"][:, 1:])
        for i, blk in enumerate(b.blocks):
            for ours, theirs in [(blk.norm1, "norm1"), (blk.attn.qkv, "attn.qkv"),
                                 (blk.attn.proj, "attn.proj"), (blk.norm2, "norm2"),
                                 (blk.mlp.fc1, "mlp.fc1"), (blk.mlp.fc2, "mlp.fc2")]:
                ours.weight.copy_(sd[f"backbone.net.blocks.{i}.{theirs}.weight"])
                ours.bias.copy_(sd[f"backbone.net.blocks.{i}.{theirs}.bias"])
            blk.attn.rel_pos_h.copy_(sd[f"backbone.net.blocks.{i}.attn.rel_pos_h"])
            blk.attn.rel_pos_w.copy_(sd[f"backbone.net.blocks.{i}.attn.rel_pos_w"])
        for name, param in neck.named_parameters():   # simfp_<k>.<i>...: same inner names
            param.copy_(sd["backbone." + name])
        for name, param in head.named_parameters():   # proposal_generator.*, roi_heads.*
            param.copy_(sd[name])


def test_detectron2_vitdet_round_trip(tmp_path):
    sd = detectron2_vitdet_state()
    # detectron2's Checkpointer: a torch archive with the weights under "model"
    path = save_torch(tmp_path, "model_final.pth", {"model": sd, "iteration": 9})
    model = build_model(arch="vitdet-b-rcnn", checkpoint=path, **VITDET_OPTS)
    conv = model.checkpoint_conversion
    assert conv.format == "detectron2-vitdet"
    assert sorted(conv.dropped) == sorted(k for k in sd if ".mask_head." in k)
    torch.testing.assert_close(model.backbone.pos_embed.detach(),
                               sd["backbone.net.pos_embed"][:, 1:])
    ref = build_model(arch="vitdet-b-rcnn", **VITDET_OPTS)
    assign_by_hand(ref, sd)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        got, want = model(images, score_threshold=0.0), ref(images, score_threshold=0.0)
    assert sum(len(d) for d in got) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.scores, b.scores)
        assert torch.equal(a.labels, b.labels)


def test_detectron2_model_zoo_pickle_of_numpy_arrays(tmp_path):
    sd = detectron2_vitdet_state(mask_head=False)
    path = tmp_path / "model_final_61ccd1.pkl"  # the model zoo's format: numpy, plain pickle
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()},
                     "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f)
    model = build_model(arch="vitdet-b-rcnn", checkpoint=path, **VITDET_OPTS)
    torch.testing.assert_close(model.head.roi_heads.box_head.fc1.weight.detach(),
                               sd["roi_heads.box_head.fc1.weight"])


def test_relative_positions_of_another_resolution_resize_as_detectron2_does(tmp_path):
    """A 128-px checkpoint in a model built for 96 px: the tables are resized at load exactly as
    detectron2 resizes them at run time when the input size differs."""
    sd = detectron2_vitdet_state(mask_head=False)
    path = save_torch(tmp_path, "vitdet.pth", {"model": sd})
    at_96 = build_model(arch="vitdet-b-rcnn", checkpoint=path, **{**VITDET_OPTS, "input_size": 96})
    at_128 = build_model(arch="vitdet-b-rcnn", checkpoint=path, **VITDET_OPTS)
    assert at_96.backbone.blocks[1].attn.rel_pos_h.shape[0] == 2 * 6 - 1
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(at_96.backbone(x), at_128.backbone(x), rtol=1e-4, atol=1e-5)


def eventful_vitdet_from(sd):
    """The Eventful Transformers code's remap of a detectron2 ViTDet
    (configs/convert/vitdet_b.txt)."""
    parts = {"norm1": "input_layer_norm", "attn.qkv": "qkv", "attn.proj": "projection",
             "norm2": "mlp_layer_norm", "mlp.fc1": "mlp_1", "mlp.fc2": "mlp_2",
             "attn.rel_pos_h": "relative_position.y_embedding",
             "attn.rel_pos_w": "relative_position.x_embedding"}
    # simfp_<k>.<i> -> pyramid.stages.<k-2>.<j>: their norms are separate layers after convs
    pyramid = {"2.0": "0.0", "2.1": "0.1", "2.3": "0.3", "2.4": ("0.4", "0.5"),
               "2.5": ("0.6", "0.7"), "3.0": "1.0", "3.1": ("1.1", "1.2"), "3.2": ("1.3", "1.4"),
               "4.0": ("2.0", "2.1"), "4.1": ("2.2", "2.3"), "5.1": ("3.1", "3.2"),
               "5.2": ("3.3", "3.4")}
    out = {}
    for key, value in sd.items():
        if key.startswith("backbone.net.patch_embed.proj."):
            out["embedding.conv." + key.split(".")[-1]] = value
        elif key == "backbone.net.pos_embed":
            out["backbone.position_encoding.encoding"] = value[:, 1:]  # their script drops it
        elif key.startswith("backbone.net.blocks."):
            i, rest = key[len("backbone.net.blocks."):].split(".", 1)
            for src, dst in parts.items():
                if rest == src or rest.startswith(src + "."):
                    out[f"backbone.blocks.{i}.{dst}{rest[len(src):]}"] = value
        elif key.startswith("backbone.simfp_"):
            k, i, rest = key[len("backbone.simfp_"):].split(".", 2)
            target = pyramid[f"{k}.{i}"]
            if isinstance(target, tuple):
                conv_idx, norm_idx = target
                if rest.startswith("norm."):
                    out[f"pyramid.stages.{norm_idx}.{rest[5:]}"] = value
                else:
                    out[f"pyramid.stages.{conv_idx}.{rest}"] = value
            else:
                out[f"pyramid.stages.{target}.{rest}"] = value
        else:
            out[key] = value  # proposal_generator.*, roi_heads.*: detectron2 modules kept
    return out


def test_eventful_vitdet_layout_loads_the_same_weights(tmp_path):
    sd = detectron2_vitdet_state(mask_head=False)
    d2_path = save_torch(tmp_path, "d2.pth", {"model": sd})
    via_d2 = build_model(arch="vitdet-b-rcnn", checkpoint=d2_path, **VITDET_OPTS)
    ev = build_model(arch="vitdet-b-rcnn", **VITDET_OPTS)
    conv = load_into(ev, save_torch(tmp_path, "eventful.pth", eventful_vitdet_from(sd)))
    assert conv.format == "eventful-vitdet"
    for (name, a), (_, b) in zip(via_d2.state_dict().items(), ev.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_dict_that_does_not_fit_lists_missing_and_unexpected_keys(tmp_path):
    sd = detectron2_vitdet_state(mask_head=False)
    del sd["backbone.net.blocks.3.mlp.fc2.weight"]
    sd["backbone.net.blocks.3.residual.conv1.weight"] = rnd(4, 4, 1, 1)  # a residual block
    sd["roi_heads.box_predictor.cls_score.weight"] = rnd(CLASSES + 5, 32)
    path = save_torch(tmp_path, "bad.pth", {"model": sd})
    with pytest.raises(CheckpointError) as err:
        build_model(arch="vitdet-b-rcnn", checkpoint=path, **VITDET_OPTS)
    msg = str(err.value)
    assert "detectron2-vitdet layout" in msg
    assert "missing keys (1): backbone.blocks.3.mlp.fc2.weight" in msg
    assert "unexpected keys (1): backbone.blocks.3.residual.conv1.weight" in msg
    assert "wrong shape keys (1): head.roi_heads.box_predictor.cls_score.weight" in msg
    # a CenterNet-headed detector cannot take the R-CNN head: every head key is listed
    with pytest.raises(CheckpointError, match=r"missing keys .*head\.heatmap"):
        build_model(arch="vitdet-b",
                    checkpoint=save_torch(tmp_path, "ok.pth", {"model": detectron2_vitdet_state()}),
                    **{k: v for k, v in VITDET_OPTS.items() if k != "rcnn"})


def test_native_state_dicts_pass_through(tmp_path):
    from safetensors.torch import save_file

    model = build_model(arch="vit-ti", depth=1, dim=D, heads=HEADS, input_size=32, num_classes=5)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    again = build_model(arch="vit-ti", checkpoint=path, depth=1, dim=D, heads=HEADS,
                        input_size=32, num_classes=5)
    assert again.checkpoint_conversion.format == "native"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
