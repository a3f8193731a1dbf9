"""`aircupy generate --grammar-file F | --json-schema F.json | --regex R` on the real SmolLM2 (the
session's shared numpy Engine, as tests/test_cli_generate.py does), and their errors as one line."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from aircupy import console
from aircupy.cli import main
from tests.helpers.engines import numpy_engine


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture
def fake_load(monkeypatch, smollm2_path):
    engine = numpy_engine(smollm2_path)
    monkeypatch.setattr(console, "load_engine", lambda *a: engine)
    return engine


def test_json_schema_grammar_and_regex_files(fake_load, tmp_path):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = invoke(["generate", "Capital of France as JSON", "--chat", "-t", "0", "-n", "12",
                "--json-schema", str(tmp_path / "s.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(json.loads(r.stdout)["text"]) == {"city": "Paris"}
    (tmp_path / "g.gbnf").write_text('root ::= "yes" | "no"\n')
    r = invoke(["generate", "Is water wet?", "--chat", "-t", "0", "-n", "4", "--grammar-file", str(tmp_path / "g.gbnf")])
    assert r.exit_code == 0 and r.stdout.strip() in ("yes", "no")
    r = invoke(["generate", "Today is", "-t", "0", "-n", "12", "--regex", "[0-9]{4}-[0-9]{2}-[0-9]{2}"])
    assert r.exit_code == 0 and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.stdout.strip())


@pytest.mark.parametrize("args, says", [
    (["--regex", "(a"], "error: regex: does not compile"),
    (["--json-schema", "/nonexistent/s.json"], "error: --json-schema: cannot read"),
    (["--regex", "a", "--grammar-file", __file__], "only one constraint"),
])
def test_bad_constraint_options_are_one_line_errors_before_loading(monkeypatch, args, says):
    monkeypatch.setattr(console, "load_engine", lambda *a: pytest.fail("loaded a model for a bad option"))
    r = invoke(["generate", "x", *args])
    assert r.exit_code != 0 and says in r.output and len(r.output.strip().splitlines()) == 1
