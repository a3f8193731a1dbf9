"""Constrained decoding: a grammar, JSON schema, regex or choice compiled by llguidance, and the
per-sequence matcher state the sampler consults at every step.

Three pieces, each usable on its own so a batched sampler can call them per sequence:
  Constraint               what a request asks for (kind + source text), compiled and validated once,
                           without a tokenizer, when SamplingParams is built: a bad grammar is an
                           InvalidParameterError naming the parameter before any work is queued.
  build_tokenizer(tok)     llguidance's view of the GGUF vocabulary: each id's BYTES exactly as the
                           detokenizer prints them (byte-fallback <0xNN> -> one byte, SentencePiece "▁" ->
                           " "), control tokens marked special (b"\\xff" prefix, as llguidance's llama.cpp
                           binding does), every end-of-generation id an EOS. Built once per Engine.
  ConstraintState          one sequence's matcher: allowed() -> bool mask (vocab,) for the next token,
                           advance(id) after sampling, done / accepting / error.

Ending: the mask lets an end-of-generation id through only where the grammar accepts, and once the
grammar can take no further byte (done) the request ends with "stop" without sampling the EOS.

Bounds: source text is capped (MAX_SOURCE_CHARS, MAX_CHOICES), schemas are checked for nesting depth
before llguidance sees them, and llguidance's own fuel limits (LLParserLimits) bound grammar size,
lexer construction and the work of each mask step, so a pathological schema fails fast, never hangs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from aircupy.errors import InvalidParameterError

KINDS = ("grammar", "json_schema", "regex", "choice", "json_object")
MAX_SOURCE_CHARS = 256 * 1024     # a grammar, schema or regex as text
MAX_CHOICES = 1024
MAX_SCHEMA_DEPTH = 64             # nested objects/arrays in a JSON schema document
# JSON as OpenAI and llama.cpp print it compactly: ", " and ": " and no free whitespace, so a small model
# cannot wander into endless newlines inside an object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _limits():
    """llguidance's resource limits, tighter than its defaults where a request could make it slow."""
    import llguidance
    return llguidance.LLParserLimits(max_grammar_size=200_000, initial_lexer_fuel=1_000_000,
                                     step_lexer_fuel=200_000, step_max_items=50_000,
                                     max_lexer_states=100_000, verbose_errors=False)


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint. kind is one of KINDS; source the request's text (a JSON schema as JSON
    text, a choice list as a JSON array); grammar llguidance's grammar (what LLMatcher takes)."""
    kind: str
    source: str
    grammar: str

    @classmethod
    def compile(cls, kind: str, value) -> "Constraint":
        """Validate and compile `value` for `kind`; InvalidParameterError(kind, why) when it cannot."""
        import llguidance
        if kind not in KINDS:
            raise InvalidParameterError("constraint", f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        source = _source(kind, value)
        try:
            if kind == "grammar":
                grammar = llguidance.grammar_from("grammar", source)   # GBNF or Lark
            elif kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(source)
            elif kind == "choice":
                lark = "start: " + " | ".join(json.dumps(c) for c in json.loads(source))
                grammar = llguidance.LLMatcher.grammar_from_lark(lark)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(source, overrides=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise InvalidParameterError(kind, f"does not compile: {_first_line(e)}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, limits=_limits())
        if is_error:
            raise InvalidParameterError(kind, f"does not compile: {_first_line(messages[0])}")
        return cls(kind, source, grammar)


def _source(kind: str, value) -> str:
    """The constraint as bounded text; type errors name the parameter."""
    if kind == "json_object":
        if value is not True:
            raise InvalidParameterError(kind, "must be true or absent")
        return '{"type": "object"}'
    if kind == "choice":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise InvalidParameterError(kind, "must be a non-empty list of strings")
        if len(value) > MAX_CHOICES:
            raise InvalidParameterError(kind, f"at most {MAX_CHOICES} choices, got {len(value)}")
        if not all(isinstance(c, str) and c for c in value):
            raise InvalidParameterError(kind, "every choice must be a non-empty string")
        text = json.dumps(list(value))
    elif kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as e:
                raise InvalidParameterError(kind, f"is not valid JSON: {_first_line(e)}") from None
        if not isinstance(value, (dict, bool)):
            raise InvalidParameterError(kind, "must be a JSON schema object")
        _check_depth(value, kind)
        text = json.dumps(value)
    else:
        if not isinstance(value, str) or not value:
            raise InvalidParameterError(kind, "must be a non-empty string")
        text = value
    if len(text) > MAX_SOURCE_CHARS:
        raise InvalidParameterError(kind, f"is {len(text)} characters; at most {MAX_SOURCE_CHARS} are accepted")
    return text


def _check_depth(value, param: str) -> None:
    """Iterative depth walk (no recursion to overflow): refuse documents nested beyond MAX_SCHEMA_DEPTH."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > MAX_SCHEMA_DEPTH:
            raise InvalidParameterError(param, f"is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def _first_line(e) -> str:
    """llguidance's message on one line: its first lines (the cause) without the source excerpt."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip() and "|" not in ln and ln.strip() != "^"]
    return " ".join(lines[:3])[:500] if lines else type(e).__name__


def build_tokenizer(tok):
    """llguidance's LLTokenizer for an aircupy Tokenizer, from the GGUF vocabulary's token bytes."""
    import llguidance
    return llguidance.LLTokenizer(_VocabView(tok), eos_token=sorted(tok.eog_ids))


class _VocabView:
    """The duck-typed tokenizer LLTokenizer reads: token bytes, special ids, and an encode callable
    (llguidance uses it to tokenize forced text)."""

    def __init__(self, tok):
        self._tok = tok
        self.is_tokenizer_wrapper = True
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        special = [i for i in range(tok.vocab_size) if tok.is_special(i)]
        self.special_token_ids = special
        is_special = set(special)
        self.tokens = [(b"\xff" if i in is_special else b"") + tok.token_bytes(i) for i in range(tok.vocab_size)]

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tok.encode(text, add_special=False, parse_special=False)


class ConstraintState:
    """One sequence's progress through a Constraint. vocab_size is the model's logits width (it may
    exceed the tokenizer's: ids beyond it are never allowed)."""

    def __init__(self, constraint: Constraint, ll_tokenizer, vocab_size: int):
        import llguidance
        self.matcher = llguidance.LLMatcher(ll_tokenizer, constraint.grammar, log_level=0, limits=_limits())
        if self.matcher.is_error():
            raise InvalidParameterError(constraint.kind, f"does not compile: {_first_line(self.matcher.get_error())}")
        self.vocab_size = int(vocab_size)
        self.n_tokens = int(ll_tokenizer.vocab_size)

    @property
    def done(self) -> bool:
        """The grammar takes no further byte (complete), or the matcher failed: generation must end."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        """Why the matcher failed (a resource limit, an impossible token), or ""."""
        return self.matcher.get_error()

    def allowed(self) -> np.ndarray:
        """Bool mask (vocab_size,) of the ids the grammar allows next (EOS only where it accepts)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little", count=self.n_tokens).astype(bool)
        if self.vocab_size != self.n_tokens:
            out = np.zeros(self.vocab_size, dtype=bool)
            n = min(self.vocab_size, self.n_tokens)
            out[:n] = mask[:n]
            mask = out
        return mask

    def advance(self, token_id: int) -> bool:
        """Feed the sampled id; False when the grammar refused it (the matcher is then in error)."""
        return self.matcher.consume_token(int(token_id))


def mask_logits(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A copy of `logits` (vocab,) with every disallowed id at -inf (float32 stays float32)."""
    row = np.asarray(logits).reshape(-1)
    return np.where(allowed, row, np.array(-np.inf, dtype=row.dtype))
