"""Operating points: how `vidprune choose` picks them and how job specs use them."""

from __future__ import annotations

import json

import pytest

from jobs.commands.choose import choose, parse_setting
from jobs.spec import load_spec
from models import zoo_entries


def _row(model, method, setting, value, savings):
    return {"model": model, "method": method, "setting": setting, "metric": "map50",
            "value": value, "savings": savings, "split": "val"}


def test_choose_takes_the_largest_savings_within_tolerance():
    rows = [_row("m", "none", "dense", 0.900, 0.0),
            _row("m", "eventful", "r=32", 0.880, 0.80),   # 2 points down: out
            _row("m", "eventful", "r=64", 0.897, 0.60),   # chosen
            _row("m", "eventful", "r=96", 0.905, 0.40),
            _row("m", "rollout", "k=48", 0.890, 0.70),    # 1 point down: out at 0.5
            _row("other", "none", "dense", 0.5, 0.0),
            _row("other", "rollout", "k=48", 0.5, 0.3)]
    picks = choose(rows, 0.5)
    assert {m: {k: r["setting"] for k, r in p.items()} for m, p in picks.items()} == {
        "m": {"eventful": "r=64"}, "other": {"rollout": "k=48"}}
    assert choose(rows, 1.0)["m"]["rollout"]["setting"] == "k=48"


def test_parse_setting():
    assert parse_setting("r=32") == {"r": 32}
    assert parse_setting("policy=top_r,r=32") == {"policy": "top_r", "r": 32}
    assert parse_setting("default") == {}


def _spec(*sets):
    spec, _ = load_spec(None, ["input.uri=/tmp/in", "output.uri=/tmp/out", *sets])
    return spec


@pytest.mark.parametrize("task", ["detection", "recognition"])
def test_zoo_models_run_their_cards_operating_points(task):
    spec = _spec(f"model.task={task}")
    card = zoo_entries()[spec.model.name].card["pruning"]
    assert spec.pruning.method == card["default_method"]
    for key, value in card["operating_points"][spec.pruning.method].items():
        assert spec.pruning.params[key] == value


def test_spec_parameters_win_over_the_card():
    card = zoo_entries()["vitdet-synth"].card["pruning"]
    assert "eventful" in card["operating_points"] and "rollout" in card["operating_points"]
    assert _spec("pruning.method=eventful", "pruning.r=200").pruning.params["r"] == 200
    # a method named without parameters takes the card's point for it
    spec = _spec("pruning.method=rollout")
    assert spec.pruning.params["k"] == card["operating_points"]["rollout"]["k"]


def test_every_shipped_card_point_is_valid():
    from jobs.spec import validate_method_params

    for name, entry in zoo_entries().items():
        section = entry.card.get("pruning")
        assert section, f"{name} has no operating points"
        assert section["chosen_on"]["split"] == "val"
        assert section["default_method"] in {"none", *section["operating_points"]}
        for method, params in section["operating_points"].items():
            validate_method_params(method, params)
