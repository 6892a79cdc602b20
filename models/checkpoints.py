"""Loading weights safely. A checkpoint is untrusted input: safetensors files are read as
tensors only, and pickle-based files (``.pth``, ``.pkl``, ``.pyth``, ``.pt``) go through
``torch.load(weights_only=True)``, which refuses anything that would run code on load."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch

PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pyth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint could not be loaded (unsafe, unreadable, or not fitting the model)."""


def load_file(source: str | os.PathLike | BinaryIO, name: str | None = None) -> dict[str, Any]:
    """Read a checkpoint into a (possibly nested) dict of tensors without running its code.

    ``source`` is a local path or an open binary file; ``name`` (for file objects) tells the
    format by its suffix.
    """
    label = name or (str(source) if not hasattr(source, "read") else "<stream>")
    suffix = Path(label).suffix.lower()
    data = source.read() if hasattr(source, "read") else None
    if suffix == ".safetensors":
        from safetensors.torch import load as st_load, load_file as st_load_file

        try:
            return st_load(data) if data is not None else st_load_file(str(source))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{label}: not a readable safetensors file ({exc})") from None
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{label}: unsupported checkpoint format {suffix or '(no suffix)'}; use .safetensors "
            f"or one of {', '.join(PICKLE_SUFFIXES)}")
    stream = io.BytesIO(data) if data is not None else open(source, "rb")
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{label}: refused: the file needs arbitrary code to unpickle, which vidprune never "
            f"runs (weights_only loading). Convert it to safetensors in a trusted environment. "
            f"Detail: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{label}: not a readable checkpoint ({exc})") from None
    finally:
        stream.close()


#: Keys under which frameworks nest the weights (detectron2/DeiT: model, VideoMAE: module,
#: PySlowFast/ViViT: model_state).
WRAPPER_KEYS = ("model", "module", "model_state", "state_dict")


def unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a checkpoint (one wrapper level at most)."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(
                    isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError("no tensor dict found in the checkpoint (looked at the top level and "
                          f"under {', '.join(WRAPPER_KEYS)})")


def check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", shapes)):
            if items:
                shown = ", ".join(items[:12]) + (f" ... (+{len(items) - 12})" if len(items) > 12 else "")
                parts.append(f"{label} keys ({len(items)}): {shown}")
        target = getattr(getattr(model, "arch", None), "name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit {target}: " + "; ".join(parts))


def load_into(model: torch.nn.Module, source: Any, name: str | None = None) -> None:
    """Load a checkpoint (path or open file) into ``model``, converting foreign formats.

    The format is recognised from its key names (see ``models/convert.py``); a checkpoint
    that does not fit is refused with every missing and unexpected key listed.
    """
    label = name or (str(source) if not hasattr(source, "read") else "<stream>")
    from .convert import convert_for

    state = unwrap(load_file(source, name))
    converted = convert_for(model, state)
    check_keys(model, converted, label)
    model.load_state_dict(converted, strict=True)
