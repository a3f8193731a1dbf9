"""Tokenizer vs llama.cpp on both real models, streaming detokenization, and small synthetic vocabularies.

The expected ids and detokenized bytes were produced by llama.cpp itself (tests/scripts/
make_tokenizer_data.py, llama-cpp-python) and are checked in: no reference library is needed here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aircupy.errors import InvalidParameterError, UnsupportedModelError
from aircupy.gguf.detokenizer import IncrementalDecoder
from aircupy.gguf.reader import GGUFFile
from aircupy.gguf.tokenizer import Tokenizer

DATA = json.loads((Path(__file__).parent / "data" / "tokenizer_expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizers(smollm2_path, gemma3_path):
    out = {}
    for name, path in (("smollm2", smollm2_path), ("gemma3", gemma3_path)):
        with GGUFFile(path) as g:
            out[name] = Tokenizer.from_gguf(g)
    return out


MODELS = ["smollm2", "gemma3"]


@pytest.mark.parametrize("model", MODELS)
def test_vocab_facts_match_llama_cpp(tokenizers, model):
    tok, ref = tokenizers[model], DATA["models"][model]
    assert tok.vocab_size == ref["vocab_size"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (ref["bos"], ref["eos"], ref["add_bos"])
    assert tok.eog_ids == frozenset(ref["eog"])
    assert all(tok.is_special(i) for i in ref["control"])


@pytest.mark.parametrize("model", MODELS)
def test_encode_matches_llama_cpp(tokenizers, model):
    tok, cases = tokenizers[model], DATA["models"][model]["cases"]
    mismatches = []
    for case in cases:
        for key, expected in case["ids"].items():
            add, parse = key[0] == "1", key[1] == "1"
            got = tok.encode(case["text"], add_special=add, parse_special=parse)
            if got != expected:
                mismatches.append((case["text"], key, expected, got))
    assert not mismatches, mismatches[:3]
    assert len(cases) > 80


@pytest.mark.parametrize("model", MODELS)
def test_decode_matches_llama_cpp(tokenizers, model):
    tok, ref = tokenizers[model], DATA["models"][model]
    seqs = [(c["ids"]["11"], c) for c in ref["cases"]] + [(r["ids"], r) for r in ref["random_ids"]]
    for ids, case in seqs:
        assert b"".join(tok.iter_pieces(ids, skip_special=False)).hex() == case["detok_special_hex"], ids
        assert b"".join(tok.iter_pieces(ids, skip_special=True)).hex() == case["detok_plain_hex"], ids


@pytest.mark.parametrize("model", MODELS)
def test_round_trip(tokenizers, model):
    tok = tokenizers[model]
    checked = 0
    for case in DATA["models"][model]["cases"]:
        text = case["text"]
        rendered = bytes.fromhex(case["detok_special_hex"])  # llama.cpp's decode, specials printed
        if tok.add_bos:
            rendered = rendered.removeprefix(tok.token_bytes(tok.bos_id))
        if rendered != text.encode("utf-8"):
            # llama.cpp does not round-trip it either: SentencePiece's '▁' *is* its space, and SmolLM2's
            # vocabulary lacks some byte characters (0xF1...), which are dropped.
            continue
        checked += 1
        assert tok.decode(tok.encode(text, add_special=False)) == text
        # With BOS added and skipped again the text comes back too.
        assert tok.decode(tok.encode(text, parse_special=False), skip_special=True) == text
    assert checked > 0.75 * len(DATA["models"][model]["cases"])


@pytest.fixture(scope="module")
def metadata(smollm2_path, gemma3_path):
    out = {}
    for name, path in (("smollm2", smollm2_path), ("gemma3", gemma3_path)):
        with GGUFFile(path) as g:
            out[name] = dict(g.metadata)
    return out


@pytest.mark.parametrize("variant", DATA["variants"], ids=lambda v: ",".join(f"{k.split('.')[-1]}={w}" for k, w in
                                                                            v["overrides"].items()))
def test_vocabulary_variants_match_llama_cpp(metadata, variant):
    """Other pre-tokenizers (over SmolLM2's merges) and a space-prefixed SentencePiece vocabulary
    (Gemma3's, as Llama 2 would have it), against llama.cpp loading the same rewritten metadata."""
    md = dict(metadata[variant["model"]])
    for k, v in variant["overrides"].items():
        md.pop(k) if v is None else md.__setitem__(k, v)
    tok = Tokenizer.from_metadata(md)
    for text, expected in zip(variant["texts"], variant["ids"]):
        assert tok.encode(text) == expected["11"], text
        assert tok.encode(text, parse_special=False) == expected["10"], text


STREAM_TEXTS = ["emoji 😀👍🏽 👨‍👩‍👧‍👦 🇺🇸 ❤️ 🧬 🛞🦩 and 日本語のテキスト、한국어 𓀀ꙮ",
                "<start_of_turn>model\n𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ<end_of_turn><|im_end|> café"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("skip_special", [False, True])
def test_incremental_decoder_token_by_token(tokenizers, model, skip_special):
    tok = tokenizers[model]
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        dec = IncrementalDecoder(tok, skip_special=skip_special)
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special=skip_special)
        assert not any("\ufffd" in p for p in pieces)  # never half a character
    # Gemma spells emoji with byte-fallback tokens: some pushes must have held bytes back.
    if model == "gemma3":
        ids = tok.encode("🛞", add_special=False)  # not in the vocabulary: 4 byte tokens <0xF0>...
        assert len(ids) == 4
        dec = IncrementalDecoder(tok)
        assert [dec.push(i) for i in ids] == ["", "", "", "🛞"]


def test_incremental_decoder_flushes_an_unfinished_character(tokenizers):
    tok = tokenizers["gemma3"]
    ids = tok.encode("🛞", add_special=False)[:-1]  # stream cut inside the character
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == tok.decode(ids) == "\ufffd"


def test_special_token_facts(tokenizers):
    smol, gemma = tokenizers["smollm2"], tokenizers["gemma3"]
    assert smol.token_to_id("<|im_end|>") in smol.eog_ids
    assert gemma.token_to_id("<end_of_turn>") in gemma.eog_ids
    assert smol.token_text(smol.token_to_id("<|im_start|>")) == "<|im_start|>"
    assert gemma.token_text(gemma.token_to_id("▁world")) == " world"
    assert smol.decode([smol.token_to_id("<|im_end|>")], skip_special=True) == ""
    # Gemma's runs of spaces are user-defined tokens: cut out even without special parsing.
    assert gemma.encode("a" + " " * 5 + "b", add_special=False, parse_special=False)[1] == \
        gemma.token_to_id(" " * 5)
    with pytest.raises(InvalidParameterError):
        smol.decode([smol.vocab_size])
    with pytest.raises(InvalidParameterError):
        smol.encode(b"bytes")  # type: ignore[arg-type]


# ---- synthetic vocabularies: behaviour the real models don't exercise -------------------------------

def _spm_md(**extra):
    tokens = ["<unk>", "<s>", "</s>", "<ctl>"] + [f"<0x{b:02X}>" for b in range(256)] + \
             ["▁", "a", "b", "ab", "▁a", "▁ab", "c"]
    types = [2, 3, 3, 3] + [6] * 256 + [1] * 7
    scores = [0.0] * 260 + [-1.0, -2.0, -3.0, -0.5, -0.7, -0.1, -4.0]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
          "tokenizer.ggml.scores": np.array(scores, dtype=np.float32)}
    md.update({f"tokenizer.ggml.{k}": v for k, v in extra.items()})
    return md


def test_spm_defaults_space_prefix_byte_fallback_and_eos():
    tok = Tokenizer.from_metadata(_spm_md(add_eos_token=True))
    t2i = tok.token_to_id
    # llama.cpp SPM defaults: BOS 1 added, a space put in front of the text.
    ids = tok.encode("ab c")
    assert ids == [1, t2i("▁ab"), t2i("▁"), t2i("c"), 2]
    # 'é' is not in the vocabulary: its UTF-8 bytes C3 A9 become byte tokens, and decode restores it.
    ids = tok.encode("é", add_special=False)
    assert ids == [t2i("▁"), t2i("<0xC3>"), t2i("<0xA9>")]
    assert tok.decode(ids) == "é"  # the prefix space is removed again, as llama.cpp does
    # Generated tokens continuing a prompt keep their space, streamed or not.
    ids = tok.encode("ab ab", add_special=False)[1:]  # [▁ab]: the second word
    assert tok.decode(ids) == "ab" and tok.decode(ids, continuation=True) == " ab"
    dec = IncrementalDecoder(tok, continuation=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == " ab"
    # A control token is parsed only with parse_special.
    assert t2i("<ctl>") in tok.encode("a<ctl>b", add_special=False)
    assert t2i("<ctl>") not in tok.encode("a<ctl>b", add_special=False, parse_special=False)


def test_every_pre_tokenizer_in_the_table_builds():
    from aircupy.gguf.pretokenize import _table, build_pre_tokenizer

    names = sorted(_table())
    assert {"default", "llama3", "qwen2", "smollm", "gpt-4o"} <= set(names)
    for name in names:
        pieces = build_pre_tokenizer(_table()[name]).pre_tokenize_str("Hi there 12345 ok\n")
        # Pieces cover the text (byte-level mapped: ' ' -> 'Ġ', '\n' -> 'Ċ').
        assert "".join(p for p, _ in pieces) == "HiĠthereĠ12345ĠokĊ", name


def test_unsupported_vocabularies_raise():
    with pytest.raises(UnsupportedModelError, match="no tokenizer"):
        Tokenizer.from_metadata({})
    with pytest.raises(UnsupportedModelError, match="not supported"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
          "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "no-such-pre"}
    with pytest.raises(UnsupportedModelError, match="no-such-pre"):
        Tokenizer.from_metadata(md)


def test_lone_surrogate_is_a_clear_error(smollm2_path):
    from aircupy.errors import InvalidParameterError
    from aircupy.gguf.reader import GGUFFile
    from aircupy.gguf.tokenizer import Tokenizer
    with GGUFFile(smollm2_path) as g:
        tok = Tokenizer.from_gguf(g)
    with pytest.raises(InvalidParameterError, match="lone surrogate at index 2"):
        tok.encode("hi\ud800")
