"""SViT: keep-all gates equal the dense model; ragged batches equal per-stream runs; the
ledger counts the tokens each block really processed; re-activation; gate training; gates
shipped through the registry."""

import pytest
import torch

from models import ModelError, StreamRunner, build_arch, build_method
from models.ledger import Ledger
from models.methods import MethodError
from models.methods.svit import SViTState, attach_gates, default_keep_ratios, sparse_block
from models.svit_training import GateTraining, distill_mode, keep_bits, measure_keep, noise_at, \
    train_gates

from .streams import random_rel_pos

MODELS = {  # windowed + global blocks with relative position and window padding (10x10 grid,
    # windows of 4), a clip model, and a model with a class token
    "vitdet": ("vitdet-ti", dict(depth=8, dim=32, heads=2, input_size=160, window=4)),
    "videomae": ("videomae-s", dict(depth=4, dim=32, heads=2, input_size=64, clip_frames=8)),
    "vit": ("vit-ti", dict(depth=4, dim=32, heads=2, input_size=64)),
}


@pytest.fixture(scope="module")
def frames(sample_videos):
    import decord

    a = decord.VideoReader(str(sample_videos / "mma_test.mp4")).get_batch(range(0, 16, 2))
    b = decord.VideoReader(str(sample_videos / "decord_flipping_a_pancake.mkv")).get_batch(
        range(40, 56, 2))
    return [a.asnumpy(), b.asnumpy()]


def inputs_for(model, frames):
    """Two real inputs (clips for clip models, frames otherwise), preprocessed as the runner."""
    prep = StreamRunner(model, build_method("none"))
    if model.kind == "clip":
        return torch.stack([torch.stack([prep.preprocess_recognition(f) for f in v], dim=1)
                            for v in frames])
    if model.task == "detection":
        return torch.stack([prep.preprocess_detection(v[0])[0] for v in frames])
    return torch.stack([prep.preprocess_recognition(v[0]) for v in frames])


def gated_model(key, seed=0):
    torch.manual_seed(seed)
    arch, options = MODELS[key]
    model = random_rel_pos(build_arch(arch, **options).eval())
    attach_gates(model)
    return model


def force(model, keep_logit):
    with torch.no_grad():
        for gate in model.backbone.svit_gates.gates:
            gate.fc2.bias.copy_(torch.tensor([keep_logit, -keep_logit]))


def make_ragged(model, seed=1):
    """Random gates confident enough to keep different tokens in different streams."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.backbone.svit_gates.gates:
            gate.fc2.weight.normal_(0, 2.0, generator=g)
            gate.fc2.bias.zero_()


def run(model, x, method):
    led = Ledger(x.shape[0])
    state = method.new_state(model.backbone, x.shape[0])
    with torch.no_grad():
        emb = model.backbone.embed(x, led)
        tokens = method.forward(model.backbone, emb, state, led, None)
    return tokens, led, state


@pytest.mark.parametrize("key", sorted(MODELS))
def test_gates_keeping_everything_equal_the_dense_model(key, frames):
    model = gated_model(key)
    force(model, 50.0)
    x = inputs_for(model, frames)
    dense, dense_led, _ = run(model, x, build_method("none"))
    tokens, led, state = run(model, x, build_method("svit"))
    assert torch.allclose(tokens, dense, atol=1e-6)
    assert led.macs["backbone"].tolist() == dense_led.macs["backbone"].tolist()
    assert led.tokens.tolist() == dense_led.tokens.tolist()
    assert led.macs["padding"].tolist() == [0.0, 0.0]
    gates = model.backbone.svit_gates.gates
    per_token = sum(g.fc1.weight.numel() + g.fc1.out_features + g.fc2.weight.numel() + 2
                    for g in gates)
    n_grid = x.shape[-1] // 16 * x.shape[-2] // 16 * (x.shape[2] // 2 if x.ndim == 5 else 1)
    assert led.macs["overhead"].tolist() == [float(per_token * n_grid)] * 2
    assert state.keep_fraction.eq(1).all()


@pytest.mark.parametrize("key", sorted(MODELS))
def test_ragged_batch_equals_per_stream_runs(key, frames):
    model = gated_model(key)
    make_ragged(model)
    x = inputs_for(model, frames)
    tokens, led, state = run(model, x, build_method("svit"))
    assert (state.keep_fraction[0] != state.keep_fraction[1]).any()  # really ragged
    assert ((state.keep_fraction > 0) & (state.keep_fraction < 1)).any()
    for i in range(2):
        alone, led1, state1 = run(model, x[i:i + 1], build_method("svit"))
        assert torch.equal(state1.keep_fraction[0], state.keep_fraction[i])
        assert torch.allclose(alone[0], tokens[i], atol=1e-5)
        for cat in ("backbone", "overhead"):  # the stream's own work does not depend on
            assert led1.macs[cat][0].item() == led.macs[cat][i].item()  # its batch mates
        assert led1.tokens[0].item() == led.tokens[i].item()
    assert led.macs["padding"].sum() > 0


def test_windowed_attention_runs_whole_windows_and_counts_them_as_backbone(frames):
    """A windowed block computes every query of every window, pruned ones included (they are
    masked as keys only): that work runs for the stream itself, so it is backbone work, not
    padding, and one stream alone has no padding at all."""
    model = gated_model("vitdet")
    make_ragged(model)
    x = inputs_for(model, frames)[:1]
    _, led, state = run(model, x, build_method("svit"))
    assert ((state.keep_fraction > 0) & (state.keep_fraction < 1)).any()
    assert led.macs["padding"].tolist() == [0.0]
    # one windowed block on a third of its tokens: the token-wise work (qkv, projection, MLP,
    # residuals) scales with the kept tokens, the windowed attention is counted whole
    blk = next(b for b in model.backbone.blocks if b.window)
    emb = model.backbone.embed(x, Ledger(1))
    n = emb.tokens.shape[1]
    keep = torch.arange(n)[None] % 3 == 0
    block_led, attention, dense = Ledger(1), Ledger(1), Ledger(1)
    with torch.no_grad():
        sparse_block(blk, emb.tokens, keep, emb.grid, 0, block_led)
        blk.attn.attend(torch.zeros(1, n, 3 * 32), emb.grid, blk.window, ledger=attention)
        blk(emb.tokens, emb.grid, 0, dense)
    whole, per_token = attention.macs["backbone"][0].item(), dense.macs["backbone"][0].item()
    per_token = (per_token - whole) / n
    assert block_led.macs["backbone"][0].item() == whole + per_token * int(keep.sum())
    assert block_led.macs["padding"].tolist() == [0.0]


def test_ledger_counts_the_tokens_each_block_processed(frames):
    """The clip model: each gated block's work equals a dense block run on the kept tokens
    alone; the token count is the sum of kept tokens over blocks."""
    model = gated_model("videomae")
    make_ragged(model)
    x = inputs_for(model, frames)
    _, led, state = run(model, x, build_method("svit"))
    n = 4 * 4 * 4  # tokens per clip: 4 slices of 4x4
    gates = model.backbone.svit_gates
    for i in range(2):
        kept = [round(f * n) for f in state.keep_fraction[i].tolist()]
        blocks = [n] * gates.dense_blocks + kept
        assert led.tokens[i].item() == sum(blocks)
        expected = 0.0
        for blk, k in zip(model.backbone.blocks, blocks):
            block_led = Ledger(1)
            with torch.device("meta"):
                blk.to("meta")(torch.zeros(1, k, 32, device="meta"), (k,), 0, block_led)
            expected += block_led.macs["backbone"][0].item()
        assert led.macs["backbone"][i].item() == expected


def test_pruned_tokens_keep_stale_features_and_can_come_back(frames):
    model = gated_model("vitdet")
    x = inputs_for(model, frames)
    with torch.no_grad():
        emb = model.backbone.embed(x)
        blk = model.backbone.blocks[3]
        keep = torch.rand(2, emb.tokens.shape[1], generator=torch.Generator().manual_seed(0)) > 0.5
        out = sparse_block(blk, emb.tokens, keep, emb.grid, 0)
    assert torch.equal(out[~keep], emb.tokens[~keep])  # stale, untouched
    assert not torch.isclose(out[keep], emb.tokens[keep]).all(dim=-1).any()
    # every gate sees the full map: a later gate that keeps all re-activates them
    force(model, 50.0)
    with torch.no_grad():
        gates = model.backbone.svit_gates
        gates.gates[0].fc2.bias.copy_(torch.tensor([-50.0, 50.0]))  # block 2 prunes all
    _, led, state = run(model, x, build_method("svit"))
    assert state.keep_fraction[:, 0].eq(0).all() and state.keep_fraction[:, 1:].eq(1).all()


def test_gates_train_on_a_vivit_whose_steps_are_tubelets():
    """A ViViT with tubelets of 2 frames (ViViT-B's layout): the gates see the spatial
    model's inputs of 6 channels (two frames per step), as the runner gives them, and the
    temporal model one embedding per step."""
    from models import build_model

    torch.manual_seed(0)
    model = build_model(arch="vivit-ti", input_size=32, depth=4, clip_frames=4,
                        temporal_depth=1, num_classes=3, tubelet=2)
    attach_gates(model)
    clips = torch.randn(2, 3, 4, 32, 32)
    for labels in (torch.tensor([0, 1]), None):  # the task loss, then distillation
        history = train_gates(model, [(clips, labels)], GateTraining(steps=1))
        assert len(history) == 1 and torch.isfinite(torch.tensor(history[0].loss))
    measured = measure_keep(model, clips)
    assert len(measured.fraction) == len(model.backbone.svit_gates.gates)


def test_training_moves_the_keep_ratio_towards_its_targets():
    torch.manual_seed(0)
    model = build_arch("videomae-s", depth=4, dim=32, heads=2, input_size=64, clip_frames=4,
                       num_classes=2).eval()
    gates = attach_gates(model)
    assert gates.keep_ratios == [0.7, 0.49, 0.343] == default_keep_ratios(3)

    def clips(steps, batch=4):  # a label the model can see: a bright or dark corner
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            y = torch.randint(0, 2, (batch,), generator=g)
            x = 0.5 * torch.randn(batch, 3, 4, 64, 64, generator=g)
            x[..., :16, :16] += (4.0 * y - 2.0)[:, None, None, None, None]
            yield x, y

    held_out = next(clips(1, 8))[0]
    before = measure_keep(model, held_out)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "svit_gates" not in k}
    history = train_gates(model, clips(30), GateTraining(steps=30, lr=1e-2))
    after = measure_keep(model, held_out)
    assert len(history) == 30
    assert history[-1].ratio_loss < history[0].ratio_loss
    dist = [sum(abs(p - t) for p, t in zip(m.probability, gates.keep_ratios))
            for m in (before, after)]
    assert dist[1] < 0.5 * dist[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_detector_gates_distil_to_the_dense_model(frames):
    model = gated_model("vitdet")
    x = inputs_for(model, frames)
    gate_before = model.backbone.svit_gates.gates[0].fc1.weight.clone()
    history = train_gates(model, [(x, None)] * 2, GateTraining(steps=2))
    assert len(history) == 2 and all(h.task_loss > 0 for h in history)
    assert not torch.equal(gate_before, model.backbone.svit_gates.gates[0].fc1.weight)


def test_detector_gates_train_on_the_detectors_own_loss(frames):
    """With labels, a detector's gates train on its CenterNet loss: with every gate keeping
    all tokens, the gated training forward gives exactly the loss `vidprune train` uses."""
    from models.training import detection_loss

    model = gated_model("vitdet")
    x = inputs_for(model, frames)
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 90.0]]), torch.tensor([[5.0, 5.0, 40.0, 30.0],
                                                                     [80.0, 70.0, 150.0, 120.0]])]
    classes = [torch.tensor([0]), torch.tensor([1, 0])]
    force(model, 30.0)  # every Gumbel draw keeps: the gated map is the dense one
    with torch.no_grad():
        expected = float(detection_loss(model, x, boxes, classes)["loss"])
    history = train_gates(model, [(x, (boxes, classes))], GateTraining(steps=1))
    assert history[0].task_loss == pytest.approx(expected, rel=1e-5)
    assert history[0].keep == [1.0] * len(model.backbone.svit_gates.gates)
    force(model, 0.0)  # undecided gates: the detection loss reaches them
    model.backbone.svit_gates.zero_grad(set_to_none=True)
    history = train_gates(model, [(x, (boxes, classes))], GateTraining(steps=1,
                                                                       ratio_weight=0.0))
    assert history[0].ratio_loss > 0 and history[0].task_loss > 0
    grads = [g.fc1.weight.grad for g in model.backbone.svit_gates.gates]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gates_ship_through_the_registry(frames, tmp_path, monkeypatch):
    import json

    from safetensors.torch import save_file

    import models.registry as registry
    from models import build_model

    model = gated_model("vitdet")
    make_ragged(model)
    assert any(k.startswith("backbone.svit_gates.gates.0.") for k in model.state_dict())
    save_file(model.state_dict(), str(tmp_path / "tiny-svit.safetensors"))
    (tmp_path / "tiny-svit.json").write_text(json.dumps(
        {"arch": model.arch.name, "options": model.build_options,
         "class_names": model.class_names}))
    monkeypatch.setattr(registry, "ZOO_DIR", tmp_path)
    loaded = build_model("tiny-svit")
    assert loaded.backbone.svit_gates.spec() == model.backbone.svit_gates.spec()
    runner = StreamRunner(loaded, build_method("svit"), input_size=160)
    state = runner.new_state(2)
    outs = runner.step([frames[0][0], frames[1][0]], state)
    assert all(o.detections is not None and o.gmacs_run < o.gmacs_dense for o in outs)
    with pytest.raises(MethodError, match="train-gates"):
        build_method("svit").check(build_arch("vitdet-ti", depth=4, dim=32, heads=2))
    with pytest.raises(ModelError, match="svit"):
        build_arch("vitdet-ti", depth=4, dim=32, heads=2, svit={"keep_ratios": [0.5]})


def corner_clips(steps, batch=4, seed=1):
    """Clips whose class shows in one corner only (bright or dark), so most tokens carry
    nothing the model needs and only the corner's matter."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        y = torch.randint(0, 2, (batch,), generator=g)
        x = 0.5 * torch.randn(batch, 3, 4, 64, 64, generator=g)
        x[..., :16, :16] += (4.0 * y - 2.0)[:, None, None, None, None]
        yield x, y


@pytest.fixture(scope="module")
def distilled_recognizer():
    """A tiny recognizer first taught the corner task, then given gates trained without
    labels (distilled to itself, the way `vidprune train-gates` trains), backbone included."""
    torch.manual_seed(0)
    model = build_arch("videomae-s", depth=4, dim=32, heads=2, input_size=64, clip_frames=4,
                       num_classes=2).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for x, y in corner_clips(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    attach_gates(model)
    config = GateTraining(steps=60, lr=1e-2, backbone_lr=1e-3)
    history = train_gates(model, ((x, None) for x, _ in corner_clips(60, seed=2)), config)
    held_out = next(corner_clips(1, 16, seed=3))[0]
    return model, history, measure_keep(model, held_out)


def test_logit_distillation_brings_the_training_keep_bits_to_their_targets(
        distilled_recognizer):
    model, history, _ = distilled_recognizer
    assert distill_mode(model, GateTraining()) == "logits"
    targets = model.backbone.svit_gates.keep_ratios
    late = [sum(r.keep[i] for r in history[-20:]) / 20 for i in range(len(targets))]
    assert all(abs(k - t) < 0.08 for k, t in zip(late, targets)), (late, targets)


@pytest.mark.xfail(strict=True, reason=(
    "known gap of the paper's recipe (settle=0; docs/RESULTS.md, SViT notes): the Gumbel "
    "keep bits meet their targets in expectation while every token's keep probability "
    "settles near the target itself, so keep-iff-the-keep-logit-wins keeps all tokens of a "
    "block whose target is above 0.5 and none below. Settling the noise (settle > 0) ends "
    "training on the inference decisions (test_settled_training_forward_decides_as_"
    "inference_does) and brought the zoo models' val keep fractions to their targets, but "
    "on this tiny model the settled gates decide by margins so small that held-out "
    "fractions did not follow the training's reliably, so this test keeps the paper's "
    "recipe"))
def test_inference_keeps_as_many_tokens_as_training_did(distilled_recognizer):
    model, history, measured = distilled_recognizer
    late = [sum(r.keep[i] for r in history[-20:]) / 20 for i in range(len(measured.fraction))]
    assert all(abs(f - k) < 0.15 for f, k in zip(measured.fraction, late)), \
        (measured.fraction, late)


def test_settling_fades_the_gumbel_noise_to_the_inference_decisions():
    """``settle``: full Gumbel noise (the paper's keep bits, the same draws as
    F.gumbel_softmax) until the last share of the steps, then linearly down to none at the
    last step, where the keep bits are the inference rule's decisions."""
    config = GateTraining(steps=10, settle=0.4)
    assert [noise_at(s, config) for s in range(1, 11)] == pytest.approx(
        [1.0] * 6 + [0.75, 0.5, 0.25, 0.0])
    assert all(noise_at(s, GateTraining(steps=10)) == 1.0 for s in range(1, 11))
    with pytest.raises(ValueError, match="settle"):
        GateTraining(settle=1.5)
    logp = torch.randn(3, 40, 2).log_softmax(dim=-1).requires_grad_()
    weights = torch.arange(40.0)
    torch.manual_seed(5)
    paper = torch.nn.functional.gumbel_softmax(logp, tau=1.0, hard=True)[..., 0]
    torch.manual_seed(5)
    ours = keep_bits(logp, 1.0, 1.0)
    assert torch.equal(paper, ours)
    grads = [torch.autograd.grad((k * weights).sum(), logp)[0] for k in (paper, ours)]
    assert torch.allclose(*grads, atol=1e-6)
    settled = keep_bits(logp, 1.0, 0.0)
    assert torch.equal(settled.detach(), (logp[..., 0] > logp[..., 1]).float())
    assert 0 < settled.detach().mean() < 1  # a real mix of decisions
    assert torch.autograd.grad(settled.sum(), logp)[0].abs().sum() > 0  # still trains


@pytest.mark.parametrize("key", ["vitdet", "videomae", "vit"])
def test_settled_training_forward_decides_as_inference_does(key, frames):
    """Once the noise has faded (the end of ``settle``), the training forward (full map,
    pruned tokens masked as keys) keeps exactly the tokens inference keeps (gathered kept
    tokens, windowed attention, re-activation), block after block: what the keep-ratio loss
    held to the targets in the last steps is what inference does."""
    from models.svit_training import _embed, gated_forward_train

    model = gated_model(key)
    make_ragged(model)
    x = inputs_for(model, frames)
    with torch.no_grad():
        _, keeps = gated_forward_train(model.backbone, _embed(model, x),
                                       model.backbone.svit_gates, noise=0.0)
        _, _, state = run(model, x, build_method("svit"))
    trained = torch.stack([k.mean(dim=1) for k in keeps], dim=1)
    assert 0 < float(trained.mean()) < 1
    assert torch.allclose(trained, state.keep_fraction, atol=1e-6), (trained, state.keep_fraction)
