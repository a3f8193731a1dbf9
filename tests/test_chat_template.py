"""Chat templates: SmolLM2's real template vs transformers' output (checked in), the built-in fallbacks,
the transformers-compatible environment, and templates that try to escape the sandbox."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from aircupy.errors import InvalidParameterError, TemplateError
from aircupy.gguf.chat_template import ChatTemplate

DATA = json.loads((Path(__file__).parent / "data" / "tokenizer_expected.json").read_text(encoding="utf-8"))


def test_smollm2_template_matches_transformers(smol_chat):
    tok, tmpl, _ = smol_chat
    assert tmpl.source == "gguf"
    cases = DATA["chat_templates"]["smollm2"]
    assert cases
    for case in cases:
        assert tmpl.render(case["messages"], add_generation_prompt=case["add_generation_prompt"]) == case["expected"]


def test_smollm2_prompt_tokenizes_to_chat_tokens(smol_chat):
    tok, tmpl, _ = smol_chat
    ids = tok.encode(tmpl.render([{"role": "user", "content": "hi"}]))
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert im_end in tok.eog_ids


def test_content_parts_are_flattened(smol_chat):
    _, tmpl, _ = smol_chat
    as_text = tmpl.render([{"role": "user", "content": "first\nsecond"}])
    as_parts = tmpl.render([{"role": "user", "content": [{"type": "text", "text": "first"},
                                                          {"type": "text", "text": "second"}]}])
    assert as_parts == as_text
    with pytest.raises(InvalidParameterError):
        tmpl.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(InvalidParameterError):
        tmpl.render([{"content": "no role"}])


def test_gemma_fallback_turn_format(gemma_chat):
    tok, tmpl = gemma_chat
    assert tmpl.source == "gemma (fallback)"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    out = tmpl.render(msgs)
    # BOS is left to the tokenizer (gemma_chat adds it), system text folds into the first user turn.
    assert out == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                   "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode(out)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids[1] == tok.token_to_id("<start_of_turn>")
    with pytest.raises(TemplateError, match="alternate"):
        tmpl.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chatml_fallback_without_template(smol_chat):
    tok, _, md = smol_chat
    md = {k: v for k, v in md.items() if k != "tokenizer.chat_template"}
    tmpl = ChatTemplate.from_metadata(md, tok)
    assert tmpl.source == "chatml (fallback)"
    assert tmpl.render([{"role": "user", "content": "x"}]) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def _template(smol_chat, text):
    tok, _, md = smol_chat
    return ChatTemplate.from_metadata({**md, "tokenizer.chat_template": text}, tok)


def test_environment_matches_transformers(smol_chat):
    t = _template(smol_chat, "{{ tools | tojson }}|{{ {'k': 'é'} | tojson(indent=2) }}|"
                        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
                        "{{ bos_token }}{{ eos_token }}|{{ strftime_now('%Y') | length }}\n"
                        "{% if add_generation_prompt %}gen{% endif %}")
    tools = [{"type": "function", "function": {"name": "météo"}}]
    out = t.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tools=tools)
    assert out == ('[{"type": "function", "function": {"name": "météo"}}]|{\n  "k": "é"\n}|user|'
                   "<|im_start|><|im_end|>|4\ngen")
    # trim_blocks / lstrip_blocks: block tags leave no whitespace behind.
    t = _template(smol_chat, "  {% if true %}\nyes\n  {% endif %}\nend")
    assert t.render([]) == "yes\nend"
    with pytest.raises(TemplateError, match="custom failure"):
        _template(smol_chat, "{{ raise_exception('custom failure') }}").render([])
    with pytest.raises(TemplateError):
        _template(smol_chat, "{% if %}")  # syntax error at construction


ATTACKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ namespace.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ (''|attr('__class__')).__mro__ }}",
    "{{ '{0.__class__.__mro__}'.format(1) }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ 'x' * 10000000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # CVE-2024-34359 payload (llama-cpp-python), pointed at a marker file
    "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
    "{{ x()._module.__builtins__['__import__']('os').popen('touch {marker}') }}{% endif %}{% endfor %}",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_sandbox_escapes_fail_and_execute_nothing(smol_chat, tmp_path, attack):
    marker = tmp_path / "pwned"
    t = _template(smol_chat, attack.replace("{marker}", str(marker)))
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "hi"}])
    assert not marker.exists()
