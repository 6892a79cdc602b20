"""The documents stay true to the code: every output column and spec key is documented,
and CI runs exactly the README's test command."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from jobs.spec import JobSpec
from pipeline import schemas

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["MANIFEST", "DETECTIONS", "RECOGNITIONS", "SEGMENTS", "VIDEOS"])
def test_every_output_column_is_documented(name):
    text = (ROOT / "docs" / "OUTPUTS.md").read_text()
    section = text.split(f"## {name}", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z0-9_]+)`", section))
    missing = set(getattr(schemas, name).names) - documented
    assert not missing, f"docs/OUTPUTS.md, {name}: undocumented columns {sorted(missing)}"


def spec_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for field_name, field in model.model_fields.items():
        keys.add(f"{prefix}{field_name}")
        for arg in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg.__name__ != "PruningSpec":
                keys |= spec_keys(arg, f"{prefix}{field_name}.")
    return keys


def test_every_spec_key_is_documented():
    text = (ROOT / "docs" / "SPEC.md").read_text()
    yaml_block = text.split("```yaml", 1)[1].split("```", 1)[0]
    for key in sorted(spec_keys(JobSpec)):
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"\b{leaf}:", yaml_block), f"docs/SPEC.md: {key} not in the example"
        assert re.search(rf"`([a-z_.]+\.)?{leaf}`", text), f"docs/SPEC.md: {key} not explained"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    assert command == ci
    run = readme.split("## Run it", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert run.strip().endswith("vidprune demo") and "torch==2.13.0" in run


def test_architecture_lists_every_module():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`([\w/.-]+)`", text))
    missing = []
    for top in ("models", "operators", "pipeline", "jobs"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py" or rel.startswith("jobs/commands/"):
                continue
            # the models table names its modules relative to models/, pruning methods by name
            accepted = {rel}
            if top == "models":
                accepted |= {rel[len("models/"):], path.name}
                if path.parent.name == "methods":
                    accepted.add(path.stem)
            if not accepted & named:
                missing.append(rel)
    assert not missing, f"docs/ARCHITECTURE.md does not list {missing}"
    for ref in named:
        if re.fullmatch(r"(models|operators|pipeline|jobs)/[\w/]+\.py", ref):
            assert (ROOT / ref).exists(), f"docs/ARCHITECTURE.md names {ref}, which does not exist"
