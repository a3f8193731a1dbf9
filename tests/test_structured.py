"""Constrained decoding on the real models (numpy backend): every output finished under a JSON schema
parses and validates (`jsonschema`, formats checked), every grammar output matches an independent regex,
json_object always parses, choice always returns a choice; and the pieces beneath: the vocabulary view
llguidance gets (token bytes as the detokenizer prints them), EOS only where the grammar accepts, and
constraints refused at construction with the parameter named.

Default run: a representative subset (SmolLM2: 4 schemas + 1 seeded twice, 5 grammars, json_object,
choice, regex; Gemma3: 2 grammars). `-m slow`: every schema and grammar of
tests/helpers/structured_cases.py on both models.
"""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from aircupy.engine.params import SamplingParams
from aircupy.errors import InvalidParameterError
from tests.helpers.engines import numpy_engine
from tests.helpers.structured_cases import GRAMMARS, SCHEMAS

SCHEMA_BY_NAME = dict(SCHEMAS)
DEFAULT_SMOL = ["person", "any_of_id", "int_array", "one_of_shape"]
GRAMMAR_BY_NAME = {n: (g, r) for n, g, r in GRAMMARS}
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return numpy_engine(smollm2_path, 512)


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    return numpy_engine(gemma3_path, 512)


def _prompt(engine, text):
    """A chat turn where the model has a template (SmolLM2), plain text for the base Gemma3."""
    return [{"role": "user", "content": text}] if engine.chat_template.source == "gguf" else text + "\n"


def _check_schema(engine, name, **sampling):
    schema = SCHEMA_BY_NAME[name]
    r = engine.generate(_prompt(engine, f"Reply with a JSON value for `{name}`."),
                        SamplingParams(json_schema=schema, max_tokens=MAX_TOKENS, **sampling))
    assert r.finish_reason == "stop", (name, r.text)
    jsonschema.validate(json.loads(r.text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _check_grammar(engine, name, **sampling):
    gbnf, pattern = GRAMMAR_BY_NAME[name]
    r = engine.generate(_prompt(engine, f"Write an example of `{name}`."),
                        SamplingParams(grammar=gbnf, max_tokens=40, **sampling))
    assert r.finish_reason == "stop" and re.fullmatch(pattern, r.text), (name, r.text)


@pytest.mark.parametrize("name", DEFAULT_SMOL)
def test_smollm2_schema_outputs_validate(smol, name):
    _check_schema(smol, name, temperature=0)


@pytest.mark.parametrize("seed", [1, 2])
def test_smollm2_seeded_samples_validate(smol, seed):
    _check_schema(smol, "sentiment", temperature=0.9, seed=seed)
    _check_grammar(smol, "greeting", temperature=0.9, seed=seed)


@pytest.mark.parametrize("name", ["yes_no", "date", "sql_select", "tiny_json_array"])
def test_smollm2_grammar_outputs_match(smol, name):
    _check_grammar(smol, name, temperature=0)


def test_json_object_parses_and_choice_is_a_choice(smol):
    r = smol.generate(_prompt(smol, "Describe a cat as a JSON object."),
                      SamplingParams(json_object=True, max_tokens=MAX_TOKENS, temperature=0))
    assert r.finish_reason == "stop" and isinstance(json.loads(r.text), dict)
    choices = ["red", "green", "blue", "dark blue"]
    for seed in (1, 2, 3):
        r = smol.generate(_prompt(smol, "What colour is the sky?"),
                          SamplingParams(choice=choices, max_tokens=8, temperature=1.0, seed=seed))
        assert r.text in choices and r.finish_reason == "stop"


def test_regex_and_ignore_eos_still_end_at_the_grammar(smol):
    r = smol.generate("My phone number is", SamplingParams(regex=r" \+1-[0-9]{3}-[0-9]{4}", max_tokens=30,
                                                           temperature=0, ignore_eos=True))
    assert re.fullmatch(r" \+1-[0-9]{3}-[0-9]{4}", r.text) and r.finish_reason == "stop"


@pytest.mark.parametrize("name", ["integer", "color_hex"])
def test_gemma3_grammar_outputs_match(gemma, name):
    _check_grammar(gemma, name, temperature=0)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smol", "gemma"])
def test_every_schema_and_grammar_on_both_models(request, model):
    engine = request.getfixturevalue(model)
    for name, _ in SCHEMAS:
        _check_schema(engine, name, temperature=0)
    for name, _, _ in GRAMMARS:
        _check_grammar(engine, name, temperature=0)


# ---- beneath: the vocabulary view, the mask, validation ------------------------------------------

def test_vocabulary_bytes_are_the_detokenizers(smol, gemma):
    from aircupy.engine.constraint import _VocabView
    for engine in (smol, gemma):
        tok = engine.tokenizer
        view = _VocabView(tok)
        ids = tok.encode("Héllo wörld\n\t{\"a\": 1} 日本", add_special=False)
        assert b"".join(view.tokens[i] for i in ids) == b"".join(tok.iter_pieces(ids, continuation=True))
        for i in sorted(tok.eog_ids):
            assert view.tokens[i].startswith(b"\xff")   # control tokens are special to llguidance
    g = gemma.tokenizer
    assert _VocabView(g).tokens[g.token_to_id("<0x0A>")] == b"\n"   # byte fallback: the byte itself


def test_eos_is_allowed_only_where_the_grammar_accepts(smol):
    c = SamplingParams(regex="ab?").constraint
    state = smol.new_constraint_state(c)
    eos = sorted(smol.tokenizer.eog_ids)
    assert not state.allowed()[eos].any()
    state.advance(smol.tokenizer.encode("a", add_special=False)[0])
    assert state.accepting and state.allowed()[eos].all() and not state.done
    state.advance(smol.tokenizer.encode("b", add_special=False)[0])
    assert state.done
    row = np.zeros(smol.config.vocab_size, dtype=np.float32)
    from aircupy.engine.constraint import mask_logits
    assert np.isneginf(mask_logits(row, np.zeros_like(row, dtype=bool))).all()


@pytest.mark.parametrize("kw, param", [
    (dict(grammar="root ::= nowhere"), "grammar"),
    (dict(grammar='root ::= "a" ('), "grammar"),
    (dict(regex="[a-"), "regex"),
    (dict(json_schema="{bad json"), "json_schema"),
    (dict(json_schema={"type": "nope"}), "json_schema"),
    (dict(json_schema=[1, 2]), "json_schema"),
    (dict(choice=[]), "choice"),
    (dict(choice=["a", 3]), "choice"),
    (dict(choice=[str(i) for i in range(5000)]), "choice"),
    (dict(json_object="yes"), "json_object"),
    (dict(regex="a", choice=["a"]), "regex"),
])
def test_constraints_are_checked_at_construction(kw, param):
    with pytest.raises(InvalidParameterError) as ei:
        SamplingParams(**kw)
    assert ei.value.param == param


def test_pathological_schemas_are_refused_or_bounded():
    deep = {"type": "integer"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    with pytest.raises(InvalidParameterError, match="nested"):
        SamplingParams(json_schema=deep)
    with pytest.raises(InvalidParameterError, match="characters"):
        SamplingParams(json_schema={"enum": ["v" * 20 + str(i) for i in range(20000)]})
    # A large but admissible enum compiles (llguidance's limits bound the work) or is refused: never hangs.
    try:
        SamplingParams(json_schema={"enum": [f"value-{i}" for i in range(5000)]})
    except InvalidParameterError as e:
        assert e.param == "json_schema"


def test_params_keep_the_schema_as_text_and_overrides_recompile():
    p = SamplingParams(json_schema={"type": "object"}, temperature=0)
    assert p.json_schema == '{"type": "object"}' and p.constraint.kind == "json_schema"
    q = p.with_overrides(max_tokens=5)
    assert q.constraint.grammar == p.constraint.grammar and SamplingParams().constraint is None
    with pytest.raises(InvalidParameterError):
        p.with_overrides(constraint=None)
