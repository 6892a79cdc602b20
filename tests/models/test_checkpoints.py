"""A checkpoint is untrusted input: code in it never runs, and bad files get clear errors."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from models import build_model
from models.checkpoints import CheckpointError, load_file


class CreatesMarker:
    """Unpickling this object calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_state():
    model = build_model(arch="vit-ti", depth=1, dim=32, heads=2, input_size=32, num_classes=3)
    return model.state_dict()


def test_the_payload_is_real(tmp_path):
    """Loaded without protection, the object does create the marker (so the tests below
    would notice if it ran)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(CreatesMarker(marker)))
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pyth", ".pt"])
def test_malicious_torch_checkpoint_is_refused(tmp_path, suffix):
    marker = tmp_path / "ran"
    path = tmp_path / f"evil{suffix}"
    torch.save({"model": {**tiny_state(), "x": CreatesMarker(marker)}}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        build_model(arch="vit-ti", checkpoint=path, depth=1, dim=32, heads=2, input_size=32,
                    num_classes=3)
    assert ".open" in str(err.value)  # the global it wanted is named
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_plain_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": CreatesMarker(marker)}, protocol=protocol))
    refused = r"refused: unpickling it would need the global \w+\.open"
    with pytest.raises(CheckpointError, match=refused):
        load_file(path)
    assert not marker.exists()


def test_malicious_file_object_is_refused(tmp_path):
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save(CreatesMarker(marker), buf)
    buf.seek(0)
    with pytest.raises(CheckpointError, match="refused"):
        load_file(buf, name="upload.pth")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl", ".pyth"])
def test_truncated_checkpoint_gives_a_clear_error(tmp_path, suffix):
    buf = io.BytesIO()
    torch.save({"model": tiny_state()}, buf)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_file(path)


@pytest.mark.parametrize("name, data", [
    ("garbage.pth", b"this is not a checkpoint at all"),
    ("garbage.pkl", b"\x80\x04definitely not a pickle"),
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
    ("empty.pth", b""),
    ("junk.pth", b"garbage\n"),  # `echo garbage > junk.pth`: starts like a pickle opcode
])
def test_garbage_files_give_clear_errors(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        load_file(path)
    assert name in str(err.value)
    assert "refused" not in str(err.value)  # unreadable, not unsafe
    assert "not a readable" in str(err.value) or "empty" in str(err.value)


def test_junk_says_what_the_file_is_not(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"garbage\n")
    with pytest.raises(CheckpointError) as err:
        load_file(path)
    assert str(err.value) == (f"{path}: not a readable checkpoint (neither a torch archive nor a "
                              f"pickle; it starts with b'garbage\\n')")


def test_a_pickle_torch_cannot_read_is_unreadable_not_unsafe(tmp_path):
    """A harmless protocol-0 pickle uses operations torch's weights-only loader lacks."""
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=0))
    with pytest.raises(CheckpointError) as err:
        load_file(path)
    assert "refused" not in str(err.value)
    assert "not a readable checkpoint (a pickle using the operation" in str(err.value)


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [0, 2])
def test_a_pickle_calling_os_system_is_refused_by_name(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": RunsCommand(f"touch {marker}")}, protocol=protocol))
    with pytest.raises(CheckpointError,
                       match=r"refused: unpickling it would need the global (os|posix)\.system,"):
        load_file(path)
    assert not marker.exists()


def test_a_hand_made_inst_pickle_is_refused_by_name(tmp_path):
    """INST imports and calls a global in one operation (torch's loader lacks it)."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(b"(V" + str(marker).encode() + b"\nVw\nibuiltins\nopen\n.")
    with pytest.raises(EnvironmentError):  # the payload is real: it would open the marker
        pickle.loads(path.read_bytes().replace(b"Vw", b"Vr"))
    with pytest.raises(CheckpointError,
                       match=r"refused: unpickling it would need the global builtins\.open,"):
        load_file(path)
    assert not marker.exists()


def test_unsupported_suffix_and_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="unsupported checkpoint format .onnx"):
        load_file(tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_file(tmp_path / "absent.pth")


def test_a_checkpoint_that_does_not_fit_summarises_each_list(tmp_path):
    """Every kind of misfit is listed, each with its first keys and how many more, so a long
    list of missing keys never hides the unexpected or mis-shaped ones."""
    state = tiny_state()
    names = sorted(state)
    kept = {k: v for k, v in state.items() if k not in names[:len(names) // 2]}
    missing = names[:len(names) // 2]
    for name in sorted(kept)[:9]:
        kept[name] = torch.zeros(*kept[name].shape, 2)
    extra = {f"extra.layer{i:02d}.weight": torch.zeros(1) for i in range(20)}
    path = tmp_path / "misfit.pth"
    torch.save({**kept, **extra}, path)
    with pytest.raises(CheckpointError) as err:
        build_model(arch="vit-ti", checkpoint=path, depth=1, dim=32, heads=2, input_size=32,
                    num_classes=3)
    msg = str(err.value)
    assert f"missing keys ({len(missing)}): {missing[0]}, " in msg
    assert f"(+{len(missing) - 6} more)" in msg
    assert "unexpected keys (20): extra.layer00.weight, " in msg
    assert "extra.layer05.weight (+14 more)" in msg and "extra.layer06" not in msg
    assert "wrong shape keys (9): " in msg and msg.endswith("(+3 more)")
    assert len(msg) < 1500


def test_checkpoint_without_tensors_is_explained(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="no tensor dict found.*top-level keys: args, epoch"):
        build_model(arch="vit-ti", checkpoint=path, depth=1, dim=32, heads=2, input_size=32,
                    num_classes=3)
