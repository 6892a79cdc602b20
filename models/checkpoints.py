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
                raise _weights_only_failure(label, str(exc), data) from None
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


def _weights_only_failure(label: str, message: str, data: bytes) -> CheckpointError:
    """Why torch's weights-only unpickler stopped, from its message: the file is unsafe (it
    needs a global that could run code) or unreadable (not a pickle at all, or one using
    operations that loader does not read)."""
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    if found:
        return _refused(label, f"the global {found.group(1)}")
    found = re.search(r"reduce for unrecognized function (.+)", message)
    if found:
        return _refused(label, f"a call of {found.group(1).strip()[:200]}")
    found = re.search(r"Unsupported operand (\d+)", message)
    if found:
        return _unsupported_operation(label, int(found.group(1)), data)
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", message)
    return _refused(label, found.group(1).strip()[:200] if found else "objects other than tensors")


#: Operations that build objects by calling code without naming a global torch would check.
_CALLING_OPERATIONS = {"OBJ", "EXT1", "EXT2", "EXT4"}


def _unsupported_operation(label: str, code: int, data: bytes) -> CheckpointError:
    """torch's loader stopped at an operation it lacks, before seeing the rest: junk that only
    starts like a pickle, or a real pickle (e.g. protocol 0) that may still need globals
    further on. The pickle is read as operations only (``pickletools``), never executed."""
    scanned = _scan_pickles(_pickle_stream(data))
    if scanned is None:
        return CheckpointError(f"{label}: not a readable checkpoint (neither a torch archive nor a "
                               f"pickle; it starts with {data[:16]!r})")
    operations, names = scanned
    allowed = _allowed_globals()
    for name in names:
        if name not in allowed:
            return _refused(label, f"the global {name}" if name else "a global it names "
                            "indirectly")
    import pickletools

    info = pickletools.code2op.get(chr(code))
    operation = info.name if info else f"0x{code:02x}"
    if operation in _CALLING_OPERATIONS & operations:
        return _refused(label, f"the pickle operation {operation}, which builds objects by "
                               f"calling code")
    return CheckpointError(
        f"{label}: not a readable checkpoint (a pickle using the operation {operation}, which "
        f"a weights-only load does not read; save the weights again with torch.save or "
        f"safetensors)")


def _pickle_stream(data: bytes) -> bytes:
    """The pickle of a torch archive (its ``data.pkl``), or the file itself."""
    if data[:4] != b"PK\x03\x04":
        return data
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return archive.read(names[0]) if names else b""
    except (zipfile.BadZipFile, OSError, ValueError):
        return b""


_STRING_OPERATIONS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                      "SHORT_BINUNICODE", "BINUNICODE8"}


def _scan_pickles(data: bytes) -> tuple[set[str], list[str]] | None:
    """The operations and the globals (``module.name``; "" when not known) of the complete
    pickles at the start of ``data`` (a legacy torch file holds several), or None when it
    does not start with one. Nothing is executed."""
    import pickletools

    stream, operations, names, complete = io.BytesIO(data), set(), [], False
    while stream.tell() < len(data):
        found_ops, found_names, pushed, memo = set(), [], [], {}
        try:
            for info, arg, _ in pickletools.genops(stream):
                found_ops.add(info.name)
                if info.name in ("GLOBAL", "INST"):
                    found_names.append(".".join(str(arg).split(" ", 1)))
                elif info.name == "STACK_GLOBAL":
                    parts = pushed[-2:]
                    known = len(parts) == 2 and all(isinstance(p, str) for p in parts)
                    found_names.append(".".join(parts) if known else "")
                elif info.name in _STRING_OPERATIONS:
                    pushed.append(arg if isinstance(arg, str) else None)
                elif info.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif info.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    memo[len(memo) if arg is None else arg] = pushed[-1] if pushed else None
                else:
                    pushed.append(None)
        except Exception:  # not (or no longer) a pickle: what follows is not read
            break
        operations |= found_ops
        names += found_names
        complete = True
    return (operations, names) if complete else None


def _allowed_globals() -> set[str]:
    """The globals torch's weights-only loader accepts (a pickle naming only these is not
    unsafe, just unreadable)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # a private API: without it, only tensor-rebuilding globals are fine
        allowed = set()
    return allowed | {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                      "torch._utils._rebuild_parameter"}


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
