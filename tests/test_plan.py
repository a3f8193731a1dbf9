"""Manifest (4 KiB windows per layer) and plan (placement under a VRAM budget): CPU tier."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from aircupy.config import ModelConfig
from aircupy.gguf.ggml import GGMLType, tensor_nbytes
from aircupy.gguf.reader import GGUFFile
from aircupy.stream.manifest import PAGE, build_manifest
from aircupy.cuda.plan import PlanError, PlanSettings, make_plan

GiB = 1 << 30


def _fake_llama(n_layers, n_embd, n_ff, n_head, n_kv, vocab, qtype=GGMLType.Q4_0):
    """A tensor table laid out as convert_hf_to_gguf writes a llama model (32-byte aligned, no data)."""
    hd = n_embd // n_head
    shapes = [("token_embd.weight", (vocab, n_embd), qtype)]
    for i in range(n_layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (n_embd,), GGMLType.F32),
                   (f"blk.{i}.attn_q.weight", (n_embd, n_embd), qtype),
                   (f"blk.{i}.attn_k.weight", (n_kv * hd, n_embd), qtype),
                   (f"blk.{i}.attn_v.weight", (n_kv * hd, n_embd), qtype),
                   (f"blk.{i}.attn_output.weight", (n_embd, n_embd), qtype),
                   (f"blk.{i}.ffn_norm.weight", (n_embd,), GGMLType.F32),
                   (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), qtype),
                   (f"blk.{i}.ffn_up.weight", (n_ff, n_embd), qtype),
                   (f"blk.{i}.ffn_down.weight", (n_embd, n_ff), qtype)]
    shapes += [("output_norm.weight", (n_embd,), GGMLType.F32), ("output.weight", (vocab, n_embd), qtype)]
    off, tensors = 7 * 4096 + 123 * 32, {}
    for name, shape, t in shapes:
        nb = tensor_nbytes(t, shape)
        tensors[name] = SimpleNamespace(name=name, ggml_type=t, shape=shape, offset=off, nbytes=nb)
        off += -(-nb // 32) * 32
    g = SimpleNamespace(path="fake.gguf", file_size=off, tensors=tensors)
    cfg = SimpleNamespace(n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_kv, head_dim=hd,
                          head_dim_v=hd, vocab_size=vocab, n_layers=n_layers)
    return g, cfg


@pytest.fixture(scope="module")
def llama70b():
    g, cfg = _fake_llama(80, 8192, 28672, 64, 8, 128256)
    return build_manifest(g), cfg


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with GGUFFile(smollm2_path) as g:
        return build_manifest(g), ModelConfig.from_gguf(g), g.tensors.copy(), g.file_size


def test_manifest_windows_are_page_aligned_and_hold_their_tensors(smollm2):
    m, cfg, tensors, size = smollm2
    assert m.n_layers == cfg.n_layers == 30
    names = set()
    for c in m.layers:
        assert c.offset % PAGE == 0
        assert c.nbytes % PAGE == 0 or c.end == size
        assert c.end <= size
        for t in c.tensors:
            names.add(t.name)
            info = tensors[t.name]
            assert t.name.startswith(f"blk.{c.layer}.")
            assert c.offset + t.offset == info.offset          # same bytes, window-relative
            assert 0 <= t.offset and t.offset + t.nbytes <= c.nbytes
            assert t.nbytes == info.nbytes
    glob = {t.name for c in m.globals for t in c.tensors}
    assert names | glob == set(tensors) and not names & glob
    assert {"token_embd.weight", "output_norm.weight"} <= glob


def test_window_clipped_at_end_of_file():
    g, _ = _fake_llama(2, 256, 512, 4, 2, 1000)
    m = build_manifest(g)
    last = max(m.globals, key=lambda c: c.end)
    assert last.end == g.file_size and g.file_size % PAGE != 0


def test_plan_everything_resident_with_room(smollm2):
    m, cfg, *_ = smollm2
    p = make_plan(m, cfg, 4 * GiB, PlanSettings(n_ctx=2048))
    assert p.resident_layers == tuple(range(30)) and p.streamed_layers == ()
    assert p.slots == 0 and p.bytes_streamed_per_pass == 0 and p.kv_placement == "vram"
    assert p.vram_bytes == sum(p.breakdown.values()) <= 4 * GiB


def test_plan_stays_within_budget_and_is_monotone(llama70b):
    m, cfg = llama70b
    prev_resident = -1
    for gib in (4, 8, 16, 24, 32, 40, 48):
        p = make_plan(m, cfg, gib * GiB, PlanSettings(n_ctx=4096))
        assert p.vram_bytes <= gib * GiB
        assert sorted(p.resident_layers + p.streamed_layers) == list(range(80))
        assert len(p.resident_layers) >= prev_resident
        prev_resident = len(p.resident_layers)
        if p.streamed_layers:
            assert p.slots >= 3 and p.slot_bytes >= m.max_layer_bytes
        streamed_w = sum(m.layers[i].nbytes for i in p.streamed_layers)
        assert p.bytes_streamed_per_pass >= streamed_w
        assert p.pcie_bound_s == pytest.approx(p.bytes_streamed_per_pass / (p.pcie_gbps * 1e9))
        assert [w["layer"] for w in p.windows] == list(range(80))


def test_plan_70b_on_a_24gb_card(llama70b):
    """A 37 GiB model under 24 GiB keeps about half its layers, as llama.cpp's -ngl 40 does."""
    m, cfg = llama70b
    p = make_plan(m, cfg, 24 * GiB, PlanSettings(n_ctx=4096))
    assert 38 <= len(p.resident_layers) <= 46
    assert p.kv_placement == "vram"
    # resident layers are spread out, not bunched at one end
    assert p.resident_layers[0] < 5 and p.resident_layers[-1] > 75


def test_kv_shuttle_when_kv_would_crowd_out_weights(llama70b):
    m, cfg = llama70b
    # A long context makes KV (80 layers x 320 MiB at 128k tokens... here 64k) larger than a layer.
    p = make_plan(m, cfg, 12 * GiB, PlanSettings(n_ctx=65536))
    assert p.kv_placement == "shuttle"
    assert p.kv_slot_bytes == p.kv_layer_bytes > 0
    assert p.breakdown["kv_cache"] == (len(p.resident_layers) + p.slots) * p.kv_layer_bytes
    assert p.vram_bytes <= 12 * GiB


def test_budget_below_minimum_states_it(llama70b):
    m, cfg = llama70b
    with pytest.raises(PlanError, match=r"below the minimum \d+\.\d+ GiB"):
        make_plan(m, cfg, 2 * GiB)


def test_fewer_than_three_slots_refused(llama70b):
    m, cfg = llama70b
    with pytest.raises(PlanError, match="at least 3 slots"):
        make_plan(m, cfg, 24 * GiB, PlanSettings(slots=2))


def test_inspect_prints_the_plan(smollm2_path):
    import json

    from click.testing import CliRunner

    from aircupy.cli import main
    r = CliRunner().invoke(main, ["inspect", str(smollm2_path), "--vram-budget", "70MB", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)["plan"]
    assert plan["vram_bytes"] <= 70_000_000 and plan["slots"] >= 3
    assert sorted(plan["resident_layers"] + plan["streamed_layers"]) == list(range(30))
    assert plan["slot_bytes"] >= max(w["nbytes"] for w in plan["windows"])
    assert [w["layer"] for w in plan["windows"]] == list(range(30))
    assert all(w["offset"] % 4096 == 0 for w in plan["windows"])
    human = CliRunner().invoke(main, ["inspect", str(smollm2_path), "--vram-budget", "70MB"])
    assert human.exit_code == 0 and "streamed layers (" in human.output and "slots: 3 x" in human.output


def test_inspect_budget_below_minimum_is_one_line(smollm2_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "aircupy", "inspect", str(smollm2_path), "--vram-budget", "10MB"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "below the minimum" in r.stderr and "Traceback" not in r.stderr
