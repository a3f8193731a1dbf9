"""SamplingParams (what a request asks of the sampler and the decode loop) and parse_size.

Defaults follow llama.cpp's (`llama-cli`): temperature 0.8, top_k 40, top_p 0.95, min_p 0.05,
repeat_penalty 1.0 (off) over the last 64 tokens. Temperature 0 means greedy (argmax). The OpenAI server
passes its own values explicitly, so these defaults matter for the CLI and the Python API only.

Every check raises InvalidParameterError(param, message) so the CLI prints one line and the server can
fill the OpenAI error object's `param` field.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from aircupy.errors import InvalidParameterError

# OpenAI's documented ranges; llama.cpp accepts wider ones, but these are what clients expect.
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling and stopping settings; validated on construction (and by replace()).

    max_tokens       tokens to generate at most (>= 1); the context limit may stop earlier ("length").
    temperature      >= 0; 0 is greedy decoding (argmax after bias and penalties).
    top_k            keep the k most likely tokens; 0 disables.
    top_p            nucleus: keep the smallest set whose probability reaches top_p; in (0, 1], 1 disables.
    min_p            drop tokens with p < min_p * p_max; in [0, 1], 0 disables.
    repeat_penalty   llama.cpp/HF repetition penalty (> 0; 1 disables) over the last `repeat_last_n`
                     prompt + generated tokens (-1: all of them, 0: none).
    presence_penalty, frequency_penalty
                     OpenAI penalties in [-2, 2] over the generated tokens only (as vLLM does).
    logit_bias       {token id: bias in [-100, 100]} added to the logits first.
    seed             None: fresh entropy; an int >= 0 makes sampling reproducible.
    stop             stop strings (never emitted); a single string is accepted.
    ignore_eos       keep generating through end-of-generation tokens.
    logprobs         None: no logprobs; K >= 0: each token's logprob plus its top-K alternatives.
    grammar, json_schema, regex, choice, json_object
                     at most one constraint on the output (engine/constraint.py): a GBNF or Lark grammar;
                     a JSON schema (dict or JSON text, kept as JSON text); a regex; a list of strings (kept
                     as a tuple); json_object=True for any JSON object. Compiled on construction (an
                     InvalidParameterError naming the field when it does not); the result is
                     `constraint` (None without one). A constrained request ends only where the grammar
                     accepts: an end-of-generation id is allowed there (even with ignore_eos), and once the
                     grammar is complete generation stops with finish_reason "stop".
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: str | None = None
    json_schema: Any = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    json_object: bool = False
    constraint: Any = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        # Normalise the forgiving input forms (one stop string, JSON-style string keys) before checking.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _normalise_bias(self.logit_bias))
        self.validate()
        object.__setattr__(self, "constraint", self._compile_constraint())

    def _compile_constraint(self):
        """The one constraint asked for, compiled (engine/constraint.py), or None."""
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if not isinstance(self.json_object, bool):
            raise InvalidParameterError("json_object", "must be true or false")
        asked = {k: v for k, v in (("grammar", self.grammar), ("json_schema", self.json_schema),
                                   ("regex", self.regex), ("choice", self.choice)) if v is not None}
        if self.json_object:
            asked["json_object"] = True
        if not asked:
            return None
        if len(asked) > 1:
            raise InvalidParameterError(sorted(asked)[1], f"only one constraint at a time, got {', '.join(sorted(asked))}")
        from aircupy.engine.constraint import Constraint   # llguidance, imported when first needed
        (kind, value), = asked.items()
        c = Constraint.compile(kind, value)
        if kind == "json_schema":   # kept as JSON text: hashable, and what was compiled
            object.__setattr__(self, "json_schema", c.source)
        return c

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Check every field; with vocab_size also check logit_bias ids and logprobs against it."""
        _int("max_tokens", self.max_tokens, lo=1)
        _num("temperature", self.temperature, lo=0.0)
        _int("top_k", self.top_k, lo=0)
        _num("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _num("min_p", self.min_p, lo=0.0, hi=1.0)
        _num("repeat_penalty", self.repeat_penalty, lo=0.0, lo_open=True)
        _int("repeat_last_n", self.repeat_last_n, lo=-1)
        _num("presence_penalty", self.presence_penalty, *PENALTY_RANGE)
        _num("frequency_penalty", self.frequency_penalty, *PENALTY_RANGE)
        if self.seed is not None:
            _int("seed", self.seed, lo=0)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameterError("stop", "must be a string or a list of non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameterError("ignore_eos", "must be true or false")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, lo=0, hi=vocab_size)
        for tok, bias in (self.logit_bias or {}).items():
            if tok < 0 or (vocab_size is not None and tok >= vocab_size):
                where = f"[0, {vocab_size})" if vocab_size is not None else "the vocabulary"
                raise InvalidParameterError("logit_bias", f"token id {tok} is outside {where}")
            _num("logit_bias", bias, *LOGIT_BIAS_RANGE)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_overrides(self, **overrides: Any) -> "SamplingParams":
        """A copy with some fields replaced; unknown names raise InvalidParameterError."""
        known = {f.name for f in fields(self) if f.init}
        for name in overrides:
            if name not in known:
                raise InvalidParameterError(name, f"unknown sampling parameter (known: {', '.join(sorted(known))})")
        return replace(self, **overrides) if overrides else self

    @classmethod
    def from_options(cls, **options: Any) -> "SamplingParams":
        """Build from optional CLI-style options; None means "use the default"."""
        return cls().with_overrides(**{k: v for k, v in options.items() if v is not None})


def _normalise_bias(bias: Mapping) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise InvalidParameterError("logit_bias", "must be a mapping of token id to bias")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:  # OpenAI clients send JSON objects, whose keys are strings of digits
            tok = int(k) if not isinstance(k, bool) else None
        except (TypeError, ValueError):
            tok = None
        if tok is None or (isinstance(k, float) and not float(k).is_integer()):
            raise InvalidParameterError("logit_bias", f"key {k!r} is not a token id")
        out[tok] = v
    return out


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num(param, x, lo=None, hi=None, lo_open=False):
    if not _is_real(x) or not math.isfinite(x):
        raise InvalidParameterError(param, f"must be a finite number, got {x!r}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        rng = f"({lo}, {hi}]" if hi is not None and lo_open else (f"[{lo}, {hi}]" if hi is not None else None)
        need = f"in {rng}" if rng else (f"> {lo}" if lo_open else f">= {lo}")
        raise InvalidParameterError(param, f"must be {need}, got {x}")
    if hi is not None and x > hi:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InvalidParameterError(param, f"must be in {rng}, got {x}")


def _int(param, x, lo=None, hi=None):
    if isinstance(x, bool) or not isinstance(x, int):
        raise InvalidParameterError(param, f"must be an integer, got {x!r}")
    if lo is not None and x < lo:
        raise InvalidParameterError(param, f"must be >= {lo}, got {x}")
    if hi is not None and x > hi:
        raise InvalidParameterError(param, f"must be <= {hi}, got {x}")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: int | str, param: str = "vram_budget") -> int:
    """Bytes from an int or a string: "4GiB" and "4G" are binary (2**30), "500MB" decimal (10**6).

    A bare number is bytes. A suffix without "i" but with "B" (kB, MB, GB, TB) is decimal as in SI;
    without "B" (4G, 512M) it is binary, as `ls -h` and docker use it. Must be > 0.
    """
    if isinstance(value, bool):
        raise InvalidParameterError(param, f"not a size: {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise InvalidParameterError(param, f"not a size: {value!r} (try 4GiB, 500MB or a number of bytes)")
        num, unit, binary, b = m.groups()
        if unit == "" and binary:  # "4iB" is no unit
            raise InvalidParameterError(param, f"not a size: {value!r}")
        base = 1024 if (binary or not b) else 1000
        n = int(float(num) * base ** _POWERS[unit.lower()])
    else:
        raise InvalidParameterError(param, f"not a size: {value!r}")
    if n <= 0:
        raise InvalidParameterError(param, f"must be > 0 bytes, got {value!r}")
    return n
