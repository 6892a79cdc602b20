"""``vidprune choose``: pick each zoo model's operating points from ``vidprune eval`` results
on the validation split, and (with ``--write``) record them in the model's card.

For every model and method, the operating point is the setting with the largest compute
savings whose metric stays within ``--tolerance`` points of the dense model's on the same
split; the model's default method is the one whose chosen point saves the most. Job specs
that name the model then run these points unless they give parameters of their own
(``jobs/spec.py``: ``resolve_pruning``). Choices are made on ``val`` only: results from the
test split are refused, so test figures stay an unbiased report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "choose", help="choose zoo models' operating points from validation results",
        description="From `vidprune eval --split val` results, choose for every model and "
                    "method the setting with the largest savings within --tolerance points "
                    "of dense accuracy, print them, and with --write record them (and the "
                    "default method: the one that saves the most) in the zoo cards.")
    p.add_argument("results", nargs="+", help="results.parquet files written by vidprune eval")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="accuracy points below dense a chosen point may lose (default 0.5)")
    p.add_argument("--write", action="store_true",
                   help="write the choices into the models' cards (models/zoo/<model>.json)")
    p.add_argument("--zoo-dir", help="the cards' folder (default: models/zoo)")
    p.set_defaults(func=run)


def parse_setting(setting: str) -> dict[str, Any]:
    """``"r=32"`` or ``"policy=top_r,r=32"`` (eval's setting column) back to parameters;
    ``"default"`` and ``"dense"`` are no parameters."""
    if setting in ("default", "dense"):
        return {}
    params = {}
    for part in setting.split(","):
        key, sep, raw = part.partition("=")
        if not sep or not key:
            raise UserError(f"cannot read the setting {setting!r} of the results")
        params[key] = yaml.safe_load(raw)
    return params


def choose(rows: list[dict[str, Any]], tolerance_points: float) -> dict[str, dict[str, Any]]:
    """``{model: {method: row}}``: per model and method, the row with the largest savings
    whose value is at least dense's minus the tolerance. Methods with no such row are left
    out."""
    dense = {r["model"]: r for r in rows if r["method"] == "none"}
    chosen: dict[str, dict[str, Any]] = {}
    for r in rows:
        base = dense.get(r["model"])
        if r["method"] == "none" or base is None:
            continue
        if r["value"] < base["value"] - tolerance_points / 100:
            continue
        best = chosen.setdefault(r["model"], {}).get(r["method"])
        if best is None or r["savings"] > best["savings"]:
            chosen[r["model"]][r["method"]] = r
    return chosen


def card_section(picks: dict[str, dict[str, Any]], dense: dict[str, Any],
                 tolerance_points: float, sources: list[str]) -> dict[str, Any]:
    # no method within tolerance: the model runs densely unless a spec asks otherwise
    default = max(picks, key=lambda m: picks[m]["savings"]) if picks else "none"
    return {
        "default_method": default,
        "operating_points": {m: parse_setting(r["setting"]) for m, r in sorted(picks.items())},
        "chosen_on": {
            "split": "val",
            "rule": f"largest savings within {tolerance_points:g} points of dense "
                    f"{dense['metric']}; default method: the largest savings",
            "command": f"vidprune choose {' '.join(sources)} --tolerance {tolerance_points:g}"
                       " --write",
            "dense": {dense["metric"]: round(dense["value"], 4)},
            "figures": {m: {"setting": r["setting"], r["metric"]: round(r["value"], 4),
                            "savings": round(r["savings"], 4)}
                        for m, r in sorted(picks.items())},
        },
    }


def run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from models.registry import ZOO_DIR

    if args.tolerance < 0:
        raise UserError(f"--tolerance must not be negative, got {args.tolerance}")
    rows: list[dict[str, Any]] = []
    for path in args.results:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file (the results.parquet of vidprune eval)")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # not Parquet at all
            raise UserError(f"{path}: not a results file of vidprune eval ({exc})") from None
        missing = {"model", "method", "setting", "metric", "value", "savings", "split"} - set(
            table.column_names)
        if missing:
            raise UserError(f"{path}: not a results file of vidprune eval (no column "
                            f"{', '.join(sorted(missing))})")
        rows += table.to_pylist()
    splits = sorted({r["split"] for r in rows})
    if splits != ["val"]:
        raise UserError(f"operating points are chosen on the validation split; these results "
                        f"are from {', '.join(splits) or 'nothing'} (run vidprune eval with "
                        "--split val)")
    picks = choose(rows, args.tolerance)
    dense = {r["model"]: r for r in rows if r["method"] == "none"}
    for model in sorted({r["model"] for r in rows}):
        base = dense.get(model)
        if base is None:
            print(f"{model}: no dense row in the results; skipped", file=sys.stderr)
            continue
        print(f"{model} (dense {base['metric']} {100 * base['value']:.2f}):")
        tried = sorted({r["method"] for r in rows if r["model"] == model} - {"none"})
        for method in tried:
            r = picks.get(model, {}).get(method)
            print(f"  {method:9s} " + (f"{r['setting']:12s} {100 * r['value']:.2f}, savings "
                                        f"{100 * r['savings']:.1f}%" if r else
                                        f"no setting within {args.tolerance:g} points"))
    if not args.write:
        return 0
    zoo = Path(args.zoo_dir or ZOO_DIR)
    for model in sorted(dense):
        card_path = zoo / f"{model}.json"
        if not card_path.is_file():
            raise UserError(f"{card_path}: no card for {model}")
        card = json.loads(card_path.read_text())
        card["pruning"] = card_section(picks.get(model, {}), dense[model], args.tolerance,
                                       args.results)
        tmp = card_path.with_name(card_path.name + ".part")
        tmp.write_text(json.dumps(card, indent=2) + "\n")
        os.replace(tmp, card_path)
        print(f"wrote {card_path}: default {card['pruning']['default_method']}")
    return 0
