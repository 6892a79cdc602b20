"""The ``vidprune`` command line.

Each sub-command lives in ``jobs/commands/<name>.py`` and provides ``add_parser(subparsers)``
(which sets ``func`` on its parser). ``func(args)`` returns the exit code. Heavy imports (torch,
ray) happen inside ``func`` so ``--help`` stays quick.

Exit codes: 0 success; 1 the job ran but failed; 2 bad input (spec, options, paths), with
every problem listed and nothing written; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .errors import UserError

#: The order commands are listed in ``--help``; modules not listed come after.
ORDER = ["run", "demo", "submit", "status", "logs", "stop", "report", "flops", "bench",
         "generate", "train", "eval", "zoo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidprune",
        description="Annotate video archives with token-pruned vision transformers on Ray.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    for name in sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        importlib.import_module(f"{commands.__name__}.{name}").add_parser(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"vidprune {version('vidprune')}"
    except Exception:  # not installed as a distribution
        return "vidprune (source)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by some commands
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"vidprune {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"vidprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
