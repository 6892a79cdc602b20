"""Pruning methods, selected by name.

Each method lives in its own module and registers itself here. ``none`` is the dense model.
"""

from __future__ import annotations

from typing import Any

from .base import Dense, Method, MethodError, MethodState, NoState, StepContext

METHODS: dict[str, type[Method]] = {"none": Dense}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, **params: Any) -> Method:
    """A method instance by name, e.g. ``build_method("eventful", policy="top_r", r=512)``."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise MethodError(
            f"unknown pruning method {name!r}; available: {', '.join(sorted(METHODS))}") from None
    return cls(**params)


def _load_builtin() -> None:
    # Importing the modules registers them; a module not written yet is simply absent.
    import importlib

    for module in ("eventful", "rollout", "stgt", "sta", "svit"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise


_load_builtin()

__all__ = ["METHODS", "Method", "MethodError", "MethodState", "NoState", "StepContext",
           "build_method", "register"]
