"""A zoo model's identity (part of every job fingerprint on it) follows what changes outputs:
its weights and the card fields that build or run it, not the card's documentation."""

import json
import shutil

from models import zoo_entries
from models.registry import ZOO_DIR


def copy_entry(tmp_path, name="vitdet-synth"):
    for suffix in (".json", ".safetensors"):
        shutil.copy(ZOO_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return tmp_path / f"{name}.json", tmp_path / f"{name}.safetensors"


def identity(tmp_path, name="vitdet-synth"):
    return zoo_entries(tmp_path)[name].identity()


def edit(card_path, change):
    card = json.loads(card_path.read_text())
    change(card)
    card_path.write_text(json.dumps(card, indent=2))


def test_documentation_edits_keep_the_identity(tmp_path):
    card_path, _ = copy_entry(tmp_path)
    before = identity(tmp_path)
    assert before == zoo_entries()["vitdet-synth"].identity()
    assert before.startswith("zoo:")
    edit(card_path, lambda c: c["model_card"].update(seed=0, notes="re-measured"))
    edit(card_path, lambda c: c["pruning"]["chosen_on"].update(note="reworded"))
    edit(card_path, lambda c: c.update(description="a new description"))
    assert identity(tmp_path) == before


def test_what_builds_or_runs_the_model_changes_it(tmp_path):
    card_path, weights = copy_entry(tmp_path)
    seen = {identity(tmp_path)}
    for change in (lambda c: c["class_names"].reverse(),
                   lambda c: c["options"].update(window=4),
                   lambda c: c["pruning"].update(default_method="none"),
                   lambda c: c.update(new_field=1)):  # unknown fields count, to be safe
        edit(card_path, change)
        seen.add(identity(tmp_path))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size, other weights
    weights.write_bytes(bytes(data))
    seen.add(identity(tmp_path))
    assert len(seen) == 6
