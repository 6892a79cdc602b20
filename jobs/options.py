"""Small parsers shared by the sub-commands."""

from __future__ import annotations

import json

from .errors import UserError


def parse_key_values(items: list[str], flag: str = "--option") -> dict:
    """``["depth=4", "neck_scales=[2.0]"]`` -> ``{"depth": 4, "neck_scales": [2.0]}``.

    Values are read as JSON where they parse, else kept as strings.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_dashboard_address(parser) -> None:
    """``--address`` of the commands that talk to a cluster's Ray Jobs API."""
    parser.add_argument("--address", default=None,
                        help="the Ray dashboard, e.g. http://HEAD:8265 (default: "
                             "$RAY_API_SERVER_ADDRESS)")
