"""Loading weights safely. A checkpoint is untrusted input: nothing in it is ever executed.

- ``.safetensors`` files are read as tensors only.
- Pickle-based files (``.pth``, ``.pt``, ``.pkl``, ``.pyth``, ...) go through
  ``torch.load(weights_only=True)``, which refuses anything that would run code on load.
- detectron2's model-zoo ``.pkl`` files are not torch archives but plain pickles of numpy
  arrays, which ``torch.load`` cannot read at all. For those (only), a restricted unpickler
  accepts exactly the globals that rebuild numpy arrays (the same ones torch's own weights-only
  unpickler allows for numpy) and refuses every other global, so no code can run either.

Every failure is a :class:`CheckpointError` that says what is wrong with the file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pyth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint could not be loaded (unsafe, unreadable, or not fitting the model)."""


def _refused(label: str, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{label}: refused: unpickling it would need {detail}, and vidprune never runs code "
        f"from a checkpoint. If you trust the file, extract its tensors in a trusted "
        f"environment (e.g. save the state dict with safetensors) and load that instead.")


def load_file(source: str | os.PathLike | BinaryIO, name: str | None = None) -> dict[str, Any]:
    """Read a checkpoint into a (possibly nested) dict of tensors without running its code.

    ``source`` is a local path or an open binary file; ``name`` (for file objects) tells the
    format by its suffix.
    """
    label = name or (str(source) if not hasattr(source, "read") else "<stream>")
    suffix = Path(label).suffix.lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{label}: unsupported checkpoint format {suffix or '(no suffix)'}; use .safetensors "
            f"or one of {', '.join(PICKLE_SUFFIXES)}")
    if hasattr(source, "read"):
        data = source.read()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{label}: cannot read the file ({exc.strerror})") from None
    if suffix == ".safetensors":
        from safetensors.torch import load as st_load

        try:
            return st_load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{label}: not a readable safetensors file ({exc})") from None
    if not data:
        raise CheckpointError(f"{label}: the file is empty")
    is_torch_archive = data[:4] == b"PK\x03\x04"
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it half supports
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if is_torch_archive or suffix != ".pkl":
            if "Weights only load failed" in str(exc):
                raise _refused(label, _unsafe_detail(str(exc))) from None
            raise CheckpointError(
                f"{label}: not a readable checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError ... on bad files
        if is_torch_archive or suffix != ".pkl":
            raise CheckpointError(
                f"{label}: not a readable checkpoint (truncated or not a torch file: "
                f"{_first_line(exc)})") from None
    return _load_numpy_pickle(data, label)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _unsafe_detail(message: str) -> str:
    """What torch's weights-only unpickler refused, from its message."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", message)
    if found:
        return f"the global {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: *(.+)", message)
    return found.group(1).strip()[:200] if found else "objects other than tensors"


#: Globals a numpy-array pickle needs (protocols 0-5, numpy 1 and 2 module names).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        numpy_dtype = module == "numpy.dtypes" and name.endswith("DType")  # numpy 2 dtypes
        if (module, name) in _NUMPY_GLOBALS or numpy_dtype:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise _UnsafeGlobal(f"{module}.{name}")


class _UnsafeGlobal(Exception):
    pass


def _load_numpy_pickle(data: bytes, label: str) -> dict[str, Any]:
    """A plain pickle of numpy arrays (detectron2's model zoo), numpy globals only."""
    import numpy as np

    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _UnsafeGlobal as exc:
        raise _refused(label, f"the global {exc}") from None
    except Exception as exc:
        raise CheckpointError(f"{label}: not a readable checkpoint ({_first_line(exc)})") from None

    def to_torch(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise CheckpointError(f"{label}: holds an array of Python objects, not numbers")
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, dict):
            return {k: to_torch(v) for k, v in value.items()}
        return value

    return to_torch(obj)


#: Keys under which frameworks nest the weights (detectron2/DeiT: model, VideoMAE: module,
#: PySlowFast/TAdaConv ViViT: model_state).
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
        found = ", ".join(sorted(map(str, obj))[:10]) or "nothing"
        raise CheckpointError(f"no tensor dict found in the checkpoint (looked at the top level "
                              f"and under {', '.join(WRAPPER_KEYS)}; top-level keys: {found})")
    raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors")


#: Keys shown of each kind (missing, unexpected, wrong shape) when a checkpoint does not fit.
KEYS_SHOWN = 6


def check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a :class:`CheckpointError` listing missing, unexpected and mis-shaped keys: the
    number of each kind, its first :data:`KEYS_SHOWN` keys and how many more."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", shapes)):
            if items:  # each list summed up on its own: a long one never hides the others
                more = f" (+{len(items) - KEYS_SHOWN} more)" if len(items) > KEYS_SHOWN else ""
                shown = ", ".join(items[:KEYS_SHOWN]) + more
                parts.append(f"{label} keys ({len(items)}): {shown}")
        target = getattr(getattr(model, "arch", None), "name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit {target}: " + "; ".join(parts))


def load_into(model: torch.nn.Module, source: Any, name: str | None = None):
    """Load a checkpoint (path or open file) into ``model``, converting foreign formats.

    The format is recognised from its key names (see ``models/convert.py``); a checkpoint
    that does not fit is refused with its missing, unexpected and mis-shaped keys. Returns the
    :class:`~models.convert.Conversion` (format, dropped keys, notes); a format that implies
    its input normalisation sets ``model.pixel_mean`` / ``model.pixel_std``.
    """
    label = name or (str(source) if not hasattr(source, "read") else "<stream>")
    from .convert import convert

    conversion = convert(model, unwrap(load_file(source, name)))
    where = label if conversion.format == "native" else f"{label} ({conversion.format} layout)"
    check_keys(model, conversion.state, where)
    model.load_state_dict(conversion.state, strict=True)
    if conversion.pixel_mean is not None:
        model.pixel_mean = conversion.pixel_mean
        model.pixel_std = conversion.pixel_std
    model.checkpoint_conversion = conversion
    return conversion
