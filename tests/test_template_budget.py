"""Chat templates that try to exhaust memory or time: each is refused by the render's budget with a
bounded allocation (measured with tracemalloc), a hostile template in a GGUF refuses the file at load
(Engine and `aircupy serve`), and real templates still render long conversations."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc

import pytest

from aircupy.errors import TemplateError, UnsafeTemplateError
from aircupy.gguf.chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, ChatTemplate
from aircupy.gguf.reader import GGUFFile
from tests.helpers.gguf_build import T, write_gguf

MB = 1 << 20
HI = [{"role": "user", "content": "hi"}]

ATTACKS = [
    "{{ 'a'.ljust(3000000000)|length }}",
    "{{ '%0100000000d' % 1 }}",
    "{{ '%.100000000f' % 1 }}",
    "{{ 'x'.center(100000000) }}",
    "{{ 'x'|center(100000000) }}",
    "{{ '{:>100000000}'.format(1) }}",
    "{{ 'ab'.zfill(100000000) }}",
    "{{ (1).to_bytes(1000000000, 'big')|length }}",
    "{{ ((2**1024)**1024)**1024 }}",
    "{{ 'aaaa'.replace('', 'x' * 1000000) }}",
    "{{ ('\\t' * 1000).expandtabs(1000000) }}",
    # doubling 40 times: in a namespace, with ~, with +, through macro arguments, in plain variables
    "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ d('a', 40) }}",
    "{% set s = 'a' %}" + "{% set s = s ~ s %}" * 40 + "{{ s|length }}",
    # shared references printed or serialised many times over
    "{% set s = 'x' * 1000000 %}{{ [s] * 1000 }}",
    "{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|tojson }}",
    "{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|join(',') }}",
    "{% set s = 'x' * 1000000 %}{{ 'a%(x)s%(x)s%(x)s' % {'x': s} }}",
    "{{ messages|tojson(indent=100000000) }}",
    "{{ [1]|batch(1000000000, 'x')|list }}",
    "{{ ''|indent(100000000, true) }}",
    # work without memory: nested loops, exponential recursion, a constant printed in a loop
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% set L = range(20)|list %}" + "{% for x in L %}" * 7 + "." + "{% endfor %}" * 7,
    "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% set x %}{% for i in range(100000) %}" + "A" * 1000 + "{% endfor %}{% endset %}{{ x|length }}",
    "{{ ('<' * 1000000)|striptags }}",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_hostile_template_is_refused_within_a_few_mb(attack):
    t = ChatTemplate(attack, "test", {}, False)
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeTemplateError):
            t.render(HI)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * MB, f"{peak / MB:.1f} MB"


@pytest.mark.parametrize("text", [CHATML_TEMPLATE, GEMMA_TEMPLATE, "smollm2"])
def test_real_templates_render_long_conversations(text, smollm2_path):
    if text == "smollm2":
        text = GGUFFile(smollm2_path).metadata["tokenizer.chat_template"]
    t = ChatTemplate(text, "test", {"bos_token": "<bos>"}, True)
    big = [{"role": "user", "content": "word " * (2 * MB // 5)}]           # 2 MiB in one message
    assert "word " * 1000 in t.render(big)
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(2001)]
    out = t.render(many)
    assert "turn 2000" in out and out.count("turn ") >= 2001


def test_budgets_are_per_render_and_per_thread():
    t = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}", "test", {}, False)
    msgs = [{"role": "user", "content": "x" * 1000}] * 100
    errors: list[BaseException] = []

    def many():
        try:
            for _ in range(50):
                assert len(t.render(msgs)) == 100_000
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=many) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_the_probe_refuses_only_unsafe_templates():
    with pytest.raises(UnsafeTemplateError, match="refused"):
        ChatTemplate("{{ 'a'.ljust(3000000000) }}", "test", {}, False).check()
    with pytest.raises(UnsafeTemplateError):
        ChatTemplate("{{ messages.__class__ }}", "test", {}, False).check()
    # a template that rejects some conversations (here: any system message) is not hostile
    picky = ChatTemplate("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}{{ m.content }}{% endfor %}", "test", {}, False)
    picky.check()
    with pytest.raises(TemplateError, match="no system") as ei:
        picky.render([{"role": "system", "content": "x"}])
    assert not isinstance(ei.value, UnsafeTemplateError)


@pytest.fixture(scope="module")
def hostile_gguf(tmp_path_factory):
    from aircupy.synth import synth_model
    d = tmp_path_factory.mktemp("hostile")
    rep = synth_model(d / "ok.gguf", "smollm2-135m", "Q8_0", n_layers=1,
                      overrides=dict(vocab=300, n_embd=64, n_head=2, n_head_kv=1, head_dim=32, n_ff=128))
    g = GGUFFile(rep.path)
    md = {**g.metadata, "tokenizer.chat_template": "{{ 'a'.ljust(3000000000)|length }}"}
    tensors = [T(n, t.ggml_type, t.shape, bytes(t.data)) for n, t in g.tensors.items()]
    return write_gguf(d / "hostile.gguf", metadata=md, tensors=tensors)


def test_a_hostile_template_refuses_the_file_at_load(hostile_gguf):
    from aircupy import Engine
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeTemplateError, match="chat template is refused"):
            Engine(hostile_gguf, backend="numpy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * MB, f"{peak / MB:.1f} MB"


def test_serve_refuses_a_hostile_file_at_start_up(hostile_gguf):
    r = subprocess.run([sys.executable, "-m", "aircupy", "serve", "--model", str(hostile_gguf), "--backend",
                        "numpy", "--port", "0"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AIRCUPY_API_KEY": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "chat template is refused" in r.stderr
