"""The docs and examples match the code: every spec field, CLI option and public name is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

import phi3tune
from phi3tune import AdapterSpec, DataSpec, FineTuner, QuantSpec, TrainSpec
from phi3tune.cli import SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _default(value) -> str:
    return "`" + (repr(value).replace("'", '"') if not isinstance(value, bool | type(None)) else str(value)) + "`"


@pytest.mark.parametrize("spec", [QuantSpec, AdapterSpec, DataSpec, TrainSpec])
def test_specs_doc_lists_every_field_with_its_default(spec):
    text = (DOCS / "specs.md").read_text()
    section = text[text.index(f"## {spec.__name__}"):]
    section = section[:section.find("\n## ", 3)]
    for name, field in spec.model_fields.items():
        assert f"| `{name}` | {_default(field.default)} |" in section, f"{spec.__name__}.{name} undocumented"


def test_cli_doc_names_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in SUBCOMMANDS:
        assert f"## {name}" in text and f"phi3tune {name}" in text, name
        for action in subparsers[name]._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and o not in ("--help", "--quiet")]
            for option in longs:
                assert option in text, f"phi3tune {name} {option} undocumented"


def test_api_doc_names_every_public_name():
    text = (DOCS / "api.md").read_text()
    for name in phi3tune.__all__:
        assert re.search(rf"\b{name}\b", text), name


def test_example_config_is_the_classic_recipe():
    path = ROOT / "examples" / "qlora_phi3.yaml"
    written = yaml.safe_load(path.read_text())
    loaded = FineTuner.from_config(path).to_config()
    classic = FineTuner("microsoft/Phi-3-mini-4k-instruct").to_config()
    for section, values in written.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert loaded[section][key] == value == classic[section][key], (section, key)
        else:
            assert loaded[section] == values == classic[section], section


def test_examples_parse_and_use_only_public_names():
    for path in (ROOT / "examples").glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "phi3tune":
                assert {a.name for a in node.names} <= set(phi3tune.__all__), path


def test_readme_first_command_runs_the_demo_via_the_console_script():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.+?)\n```", readme).group(1)
    assert first == ('pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu && '
                     'pip install -e ".[plot]" && phi3tune demo')
    entry = re.search(r'^phi3tune = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    module, func = entry.split(":")
    assert module == "phi3tune.cli" and callable(getattr(__import__(module, fromlist=[func]), func))
    assert "demo" in SUBCOMMANDS
