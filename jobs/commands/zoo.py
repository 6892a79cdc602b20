"""``vidprune zoo``: the models, architectures and pruning methods a job spec can name."""

from __future__ import annotations

import dataclasses


def add_parser(sub) -> None:
    p = sub.add_parser("zoo", help="list zoo models, architectures and pruning methods",
                       description="What model.name, model.arch and pruning.method accept.")
    p.set_defaults(func=main)


def main(args) -> int:
    from models import ARCHS, METHODS, zoo_entries

    from ..spec import DEFAULT_METHODS, DEFAULT_MODELS

    print("zoo models (model.name):")
    entries = zoo_entries()
    if not entries:
        print("  (none installed)")
    for name, e in sorted(entries.items()):
        task = ARCHS[e.arch].task if e.arch in ARCHS else "?"
        default = " (default)" if DEFAULT_MODELS.get(task) == name else ""
        print(f"  {name:<22} {task:<12} {e.arch:<14} {len(e.class_names)} classes{default}")
        points = (e.card.get("pruning") or {}).get("operating_points", {})
        if points:
            first = e.card["pruning"].get("default_method")
            order = sorted(points, key=lambda m: (m != first, m))
            print("    operating points (chosen on val): " + "; ".join(
                f"{m} " + (", ".join(f"{k}={v}" for k, v in points[m].items()) or "defaults")
                + (" (default)" if m == first else "") for m in order))
    print("\narchitectures (model.arch, with model.checkpoint):")
    for name, a in sorted(ARCHS.items()):
        print(f"  {name:<22} {a.task:<14} input {a.input_size}")
    print("\npruning methods (pruning.method and its parameters):")
    for name, cls in sorted(METHODS.items()):
        params = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(cls.Params))
        tasks = [t for t, m in DEFAULT_METHODS.items() if m == name]
        default = f" (default for {', '.join(tasks)} models without a card)" if tasks else ""
        print(f"  {name:<10} on {'/'.join(sorted(cls.kinds))} models{default}: "
              f"{params or '(no parameters)'}")
    return 0


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"
