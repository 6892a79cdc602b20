"""The ledger must reproduce the published dense baselines (counted on the meta device)."""

import pytest
import torch

from models import build_arch
from models.ledger import Ledger


def dense_gmacs(arch: str, shape: tuple[int, ...], **options) -> dict[str, float]:
    led = Ledger(1)
    with torch.device("meta"):
        model = build_arch(arch, **options)
        if model.task == "detection":  # decoding boxes is data-dependent: count up to the head
            e = model.backbone.embed(torch.zeros(*shape), led)
            tokens, _ = model.backbone.forward_blocks(e.tokens, e.grid, led)
            fmap = tokens.transpose(1, 2).reshape(1, -1, *e.grid)
            model.head(model.neck(fmap, led), led)
        else:
            model(torch.zeros(*shape), led)
    return {k: float(v[0]) / 1e9 for k, v in led.macs.items()}


@pytest.mark.parametrize("resolution, published", [(1024, 467.4), (672, 174.5)])
def test_vitdet_b_backbone_matches_published(resolution, published):
    g = dense_gmacs("vitdet-b", (1, 3, resolution, resolution))
    assert g["backbone"] == pytest.approx(published, rel=0.01)
    assert g["overhead"] == 0 and g["head"] > 0


def test_videomae_b_clip_matches_published():
    g = dense_gmacs("videomae-b", (1, 3, 16, 224, 224))
    assert g["backbone"] + g["patch_embed"] + g["head"] == pytest.approx(180, rel=0.01)


def test_vit_b16_matches_published():
    g = dense_gmacs("vit-b", (1, 3, 224, 224))
    assert sum(g.values()) == pytest.approx(17.6, rel=0.01)


def test_per_stream_counts_and_ragged_tokens():
    led = Ledger(3)
    layer = torch.nn.Linear(4, 5)
    led.linear(layer, 10)
    led.linear(layer, torch.tensor([1.0, 2.0, 0.0]), "overhead")
    assert led.macs["backbone"].tolist() == [250.0] * 3
    assert led.macs["overhead"].tolist() == [25.0, 50.0, 0.0]
    assert led.run_macs().tolist() == [275.0, 300.0, 250.0]
    with pytest.raises(ValueError):
        led.add(torch.ones(2))


def test_uniform_and_per_stream_counts_add_up_in_any_order():
    led = Ledger(2)
    led.add(7)
    assert led.macs["backbone"].tolist() == [7.0, 7.0]
    led.add(torch.tensor([1.0, 2.0]))
    led.adds(3)
    led.matmul(2, 5, "overhead")
    led.processed(4)
    led.processed(torch.tensor([1, 0]))
    # callers may add into the per-stream tensors in place (recognizers fold clip steps so)
    led.macs["head"] += torch.tensor([10.0, 20.0])
    led.add(1, "head")
    led.tokens += torch.tensor([0.0, 1.0])
    led.processed(-1)
    assert led.macs["backbone"].tolist() == [11.0, 12.0]
    assert led.macs["overhead"].tolist() == [10.0, 10.0]
    assert led.macs["head"].tolist() == [11.0, 21.0]
    assert led.tokens.tolist() == [4.0, 4.0]
    assert led.run_macs().tolist() == [21.0, 22.0]
    led.add(2)  # counted after a read: still counted
    sub = led.select([1])
    assert sub.macs["backbone"].tolist() == [14.0] and sub.tokens.tolist() == [4.0]
    sub.add(1)
    sub.merge_into(led, [1])
    assert led.macs["backbone"].tolist() == [13.0, 29.0]
    with pytest.raises(KeyError):
        led.add(1, "nonsense")


def test_counting_a_number_runs_no_tensor_operations():
    # a frame makes hundreds of counting calls; on a GPU every operator call is host time
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    led = Ledger(8)
    layer = torch.nn.Linear(4, 5)
    with Count():
        for _ in range(100):
            led.linear(layer, 10)
            led.matmul(10, 4)
            led.adds(10, "overhead")
            led.processed(10)
    assert Count.calls == 0
    assert led.run_macs().tolist() == [100 * (250 + 40 + 10)] * 8
    assert led.tokens.tolist() == [1000.0] * 8


def test_per_stream_tensors_are_counted_on_their_device_until_read():
    # The ragged policies (eventful's threshold, SViT) count tensors that live on the GPU:
    # moving each one to the host would wait for the GPU at every counting call, and even
    # multiplying and adding there launches kernels. The meta device stands in for the GPU
    # here: a copy to the CPU would fail on it. Counting runs no tensor operation at all.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Devices(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Devices.seen.add(t.device.type)
            return out

    led = Ledger(3)
    layer = torch.nn.Linear(4, 5)
    counts = torch.tensor([1, 2, 0], device="meta")
    with Devices():
        for _ in range(10):
            led.linear(layer, counts)
            led.add(torch.tensor(4.0, device="meta"), "overhead")
            led.processed(counts)
    assert Devices.seen == set()
    with pytest.raises(ValueError):
        led.add(torch.ones(2, device="meta"))

    # on the CPU: the same sums, and the caller's tensors are not added into
    led = Ledger(3)
    counts = torch.tensor([1.0, 2.0, 0.0])
    for _ in range(10):
        led.linear(layer, counts)
        led.add(torch.tensor(4.0), "overhead")
        led.processed(counts)
        led.add(1)
    assert counts.tolist() == [1.0, 2.0, 0.0]
    assert led.macs["backbone"].tolist() == [260.0, 510.0, 10.0]
    assert led.macs["overhead"].tolist() == [40.0] * 3
    assert led.tokens.tolist() == [10.0, 20.0, 0.0]
    assert led.macs["backbone"].device.type == "cpu"
    led.processed(torch.tensor(2.0))  # a 0-dim tensor applies to every stream
    led.tokens += torch.tensor([1.0, 0.0, 0.0])
    assert led.tokens.tolist() == [13.0, 22.0, 2.0]
