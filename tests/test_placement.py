"""CPU tier: the placement planner (aircupy/cuda/placement.py), the one the CUDA model builds and
`aircupy inspect --vram-budget` prints. Its pool bytes are held against an independent computation;
its choices against the rule (most resident layers that fit, fewest bytes per pass)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.cuda.placement import (CudaOptions, Footprint, PlacementSettings, PlanError, effective_budget,
                                    minimum_budget, place, plan_model, resident_set)
from aircupy.cuda.pool import fmt_bytes
from aircupy.gguf.reader import GGUFFile
from bench.harness.models import virtual_gguf

TINY = dict(vocab=512, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
L = 12
GiB = 1 << 30
PRESETS = ["llama3-8b:Q4_0", "llama-70b:Q4_0", "smollm2-135m:Q4_1", "qwen2-0.5b:Q8_0",
           "qwen3-0.6b:Q4_K", "gemma3-270m:Q6_K"]


def _tiny(tmp_path_factory, n_ctx):
    from aircupy.synth import synth_model
    rep = synth_model(tmp_path_factory.mktemp("m") / "m.gguf", "llama3-8b", "Q4_0", n_layers=L,
                      overrides=TINY, seed=3)
    g = GGUFFile(rep.path)
    return g, Footprint.of(g, ModelConfig.from_gguf(g), n_ctx, 64)


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    g, f = _tiny(tmp_path_factory, 64)
    yield f
    g.close()


@pytest.fixture(scope="module")
def long_ctx(tmp_path_factory):
    """The same model with an 8k-token context: one layer's KV (4 MiB) outweighs its weights."""
    g, f = _tiny(tmp_path_factory, 8192)
    yield f
    g.close()


def _up(n: int) -> int:
    return -(-max(int(n), 1) // 256) * 256


def oracle_pool_bytes(fp: Footprint, resident, shuttle: bool, n_slots: int = 3) -> int:
    """The pool's size from the model's shapes, written out independently of Footprint.pool_plan:
    resident blocks, slots, repack staging, KV, the activation buffers of cuda/buffers.py's table,
    and the shared scratch."""
    from aircupy.cuda.ops.packing import needs_repack
    c, rows, hr = fp.config, fp.rows, fp.hr
    E, H, Hkv, D, F, V = c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.vocab_size
    streamed = [i for i in range(len(fp.layer_ls)) if i not in set(resident)]
    total = _up(fp.glob_l.nbytes) + sum(_up(fp.layer_ls[i].nbytes) for i in resident)
    slots = min(n_slots, len(streamed))
    if streamed:
        total += slots * _up(max(fp.layer_ls[i].nbytes for i in streamed))
        raw = [256] + [fp.tensors[n].nbytes for i in streamed for p in fp.layer_ls[i].matrices()
                       if needs_repack(p.ggml_type) for n, _ in p.sources]
        total += 2 * _up(max(raw))
    kv = 2 * Hkv * fp.n_ctx * D * 2                     # K and V of one layer's slab, float16
    if shuttle and streamed:
        total += (_up(len(resident) * kv) if resident else 0) + slots * _up(kv)
    else:                                               # the paged pool: 32-token blocks
        tokens = -(-max(fp.n_ctx, fp.kv_tokens) // 32) * 32
        total += _up(len(fp.layer_ls) * 2 * Hkv * tokens * D * 2)
    f32 = [rows * E] * 3 + [rows * (H + 2 * Hkv) * D, rows * H * D, rows * Hkv * D, rows * Hkv * D,
                            rows * H * D, rows * 2 * F, rows * F, hr * E, hr * V]
    seqs, blocks = fp.max_seqs, -(-fp.n_ctx // 32)
    step = 4 * rows + seqs * blocks + seqs * (1 + 2 + 4)  # per row 4 words; tables; per logits row 7
    total += sum(_up(4 * n) for n in f32) + sum(_up(4 * n) for n in (rows, rows, max(hr, seqs), 8, step))
    return total + _up(fp.scratch_b)


def test_pool_bytes_equal_the_independent_computation(fp, long_ctx):
    for f in (fp, long_ctx):
        for n in (0, 1, 5, L - 1, L):
            for shuttle in (False, True):
                res = resident_set(L, n)
                assert f.pool_plan(res, shuttle, 3).total == oracle_pool_bytes(f, res, shuttle), (n, shuttle)


def test_a_batching_pool_equals_the_independent_computation(fp):
    """A paged pool of 1000 tokens (rounded up to 32-token blocks) and step buffers for 24 sequences."""
    from dataclasses import replace
    f = replace(fp, kv_tokens=1000, max_seqs=24)
    assert f.kv_tokens == 1024 and f.max_blocks == 2
    for n in (0, 5, L):
        res = resident_set(L, n)
        assert f.pool_plan(res, False, 3).total == oracle_pool_bytes(f, res, False), n
    assert f.pool_plan(resident_set(L, L), False, 3).total > fp.pool_plan(resident_set(L, L), False, 3).total


def test_a_planner_that_forgets_a_slot_fails_the_oracle(fp, monkeypatch):
    """The oracle catches the bug it exists for: a pool that plans one streaming slot too few."""
    real = Footprint.pool_plan

    def forgetful(self, resident, shuttle, n_slots):
        return real(self, resident, shuttle, n_slots - 1)
    monkeypatch.setattr(Footprint, "pool_plan", forgetful)
    res = resident_set(L, 5)
    assert fp.pool_plan(res, False, 3).total != oracle_pool_bytes(fp, res, False)


def test_choice_is_the_most_resident_layers_that_fit(fp):
    totals = [fp.pool_plan(resident_set(L, n), False, 3).total for n in range(L + 1)]
    # more resident layers cost more, except all-resident, which needs no slots and no staging
    assert totals[:L] == sorted(totals[:L]) and totals[0] < totals[L] <= totals[L - 1]
    for n in range(L + 1):
        for budget in (totals[n], totals[n] + 100):   # exactly the pool, and just above it
            p = place(fp, budget, PlacementSettings(kv_shuttle=False))
            best = max(k for k in range(L + 1) if totals[k] <= budget)
            assert len(p.resident_layers) == best and p.vram_bytes <= budget and not p.shuttle
            assert p.resident_layers == resident_set(L, best)
            # automatic: KV in VRAM fits here, and a layer's weights outweigh its KV (n_ctx 64)
            assert place(fp, budget) .resident_layers == p.resident_layers
            assert p.vram_bytes == oracle_pool_bytes(fp, p.resident_layers, False)


def test_slots_staging_and_streamed_figures(fp):
    p = place(fp, fp.pool_plan(resident_set(L, 5), False, 3).total)
    regions = p.pool.regions
    assert p.slots == 3 and [r for r in regions if r.startswith("stream.slot")] == \
        ["stream.slot0", "stream.slot1", "stream.slot2"]
    assert {"stream.staging0", "stream.staging1"} <= set(regions)
    assert regions["stream.slot0"].nbytes == max(fp.layer_ls[i].nbytes for i in p.streamed_layers)
    assert p.bytes_streamed_per_pass == sum(fp.layer_ls[i].nbytes for i in p.streamed_layers)
    assert p.pcie_bound_s == pytest.approx(p.bytes_streamed_per_pass / (p.pcie_gbps * 1e9))
    assert not p.pcie_rate_measured
    assert p.host_buffers == 5 and p.host_buffer_bytes == max(fp.windows[i][1] for i in p.streamed_layers)
    everything = place(fp, 1 << 40)
    assert not everything.streams and everything.slots == 0 and everything.bytes_streamed_per_pass == 0
    assert not any(r.startswith("stream.") for r in everything.pool.regions)


def test_ram_tier_takes_what_half_the_available_ram_holds(fp):
    budget = fp.pool_plan(resident_set(L, 5), False, 3).total
    streamed = sum(fp.windows[i][1] for i in range(L) if i not in resident_set(L, 5))
    assert place(fp, budget, PlacementSettings(host_ram_bytes=10 * streamed)).ram_tier_bytes == streamed
    assert place(fp, budget, PlacementSettings(host_ram_bytes=streamed)).ram_tier_bytes == streamed // 2
    assert place(fp, budget, PlacementSettings(host_ram_bytes=None)).ram_tier_bytes == 0
    assert place(fp, budget, PlacementSettings(ram_tier_bytes=123)).ram_tier_bytes == 123


def test_below_streaming_minimum_is_one_line_error(fp):
    low = minimum_budget(fp)
    assert low == oracle_pool_bytes(fp, (), True)
    for shuttle in (None, True):
        with pytest.raises(PlanError) as e:
            place(fp, low - 1, PlacementSettings(kv_shuttle=shuttle))
        msg = str(e.value)
        assert "minimum" in msg and "\n" not in msg and "shuttled" in msg and fmt_bytes(low) in msg
    with pytest.raises(PlanError, match="in VRAM, the shuttle off"):
        place(fp, fp.pool_plan((), False, 3).total - 1, PlacementSettings(kv_shuttle=False))
    with pytest.raises(PlanError, match="at least 3 slots"):
        place(fp, 1 << 40, PlacementSettings(slots=2))


def test_shuttle_regions_and_arithmetic(long_ctx):
    f, c = long_ctx, long_ctx.config
    kv_b = 2 * c.n_head_kv * 8192 * c.head_dim * 2
    for n in (0, 5, L - 2):
        res = resident_set(L, n)
        vram, sh = f.pool_plan(res, False, 3), f.pool_plan(res, True, 3)
        assert vram.regions["kv"].nbytes == L * kv_b
        n_slots = min(3, L - n)
        kvslots = [r for r in sh.regions if r.startswith("stream.kvslot")]
        assert len(kvslots) == n_slots and all(sh.regions[r].nbytes == kv_b for r in kvslots)
        assert sh.regions["kv"].nbytes == n * kv_b if n else "kv" not in sh.regions
        assert vram.total - sh.total == (L - n - n_slots) * kv_b
        assert f.bytes_per_pass(res, True) - f.bytes_per_pass(res, False) == 2 * (L - n) * kv_b
    assert f.pool_plan(range(L), True, 3).regions.keys() == f.pool_plan(range(L), False, 3).regions.keys()


def test_the_shuttle_is_taken_when_kv_in_vram_does_not_fit(long_ctx):
    f = long_ctx
    vram0, sh0 = f.pool_plan((), False, 3).total, f.pool_plan((), True, 3).total
    assert sh0 < vram0
    for budget in (sh0, (sh0 + vram0) // 2, vram0 - 1):
        p = place(f, budget)
        assert p.shuttle and p.vram_bytes <= budget
        assert len(p.resident_layers) == max(n for n in range(L)
                                             if f.pool_plan(resident_set(L, n), True, 3).total <= budget)
        assert p.host_kv_bytes == len(p.streamed_layers) * f.kv_layer_bytes()
    # Once KV in VRAM fits it streams fewer bytes here (a shuttled layer moves 2 x 4 MiB of KV to
    # save a few hundred KiB of weights), so the automatic choice keeps it
    assert not place(f, vram0).shuttle and place(f, vram0).resident_layers == ()
    assert place(f, vram0, PlacementSettings(kv_shuttle=True)).shuttle
    with pytest.raises(PlanError):
        place(f, vram0 - 1, PlacementSettings(kv_shuttle=False))


def test_forced_resident_count(fp):
    p = place(fp, 1 << 40, PlacementSettings(n_resident=4))
    assert p.resident_layers == resident_set(L, 4) and not p.shuttle
    with pytest.raises(PlanError):
        place(fp, 1 << 40, PlacementSettings(n_resident=L + 1))
    from aircupy.cuda.pool import ModelTooLargeError
    with pytest.raises(ModelTooLargeError):
        place(fp, fp.pool_plan(resident_set(L, 4), False, 3).total - 1,
              PlacementSettings(n_resident=4, kv_shuttle=False))


def test_effective_budget_never_exceeds_free_memory():
    from aircupy.cuda.placement import POOL_MARGIN
    assert effective_budget(None, 10 * GiB) == 10 * GiB - POOL_MARGIN
    assert effective_budget(4 * GiB, 10 * GiB) == 4 * GiB
    assert effective_budget(40 * GiB, 10 * GiB) == 10 * GiB - POOL_MARGIN
    assert effective_budget(40 * GiB, 10 * GiB, outside_bytes=GiB) == 11 * GiB - POOL_MARGIN
    assert effective_budget(None, 1) == 0


def test_the_budget_bounds_what_lies_outside_the_pool(fp):
    """outside_bytes (the CUDA context, kernels, cuBLAS) come off the budget before the pool."""
    budget = fp.pool_plan(resident_set(L, 5), False, 3).total
    inside = place(fp, budget)
    outside = place(fp, budget + (256 << 10), PlacementSettings(outside_bytes=256 << 10))
    assert outside.resident_layers == inside.resident_layers and outside.pool_budget == budget
    assert outside.vram_bytes + outside.outside_bytes <= outside.vram_budget
    fewer = place(fp, budget, PlacementSettings(outside_bytes=256 << 10))
    assert len(fewer.resident_layers) < len(inside.resident_layers)
    with pytest.raises(PlanError, match="less 1.95 KiB for the CUDA context and libraries leaves"):
        place(fp, minimum_budget(fp) + 1000, PlacementSettings(outside_bytes=2000))


@pytest.mark.parametrize("spec", PRESETS)
def test_full_size_presets_stay_within_budget_and_are_monotone(spec):
    """More budget never streams more bytes per pass (the resident count may drop by one where KV
    leaves the shuttle for VRAM: that moves fewer bytes)."""
    g = virtual_gguf(spec)
    c = ModelConfig.from_gguf(g)
    fp = Footprint.of(g, c, 4096)
    prev = None
    for frac in np.linspace(0.05, 1.2, 12):
        budget = int(minimum_budget(fp) + frac * sum(lay.nbytes for lay in fp.layer_ls))
        p = place(fp, budget, PlacementSettings(host_ram_bytes=64 * GiB))
        assert p.vram_bytes == p.pool.total <= budget
        assert p.vram_bytes == oracle_pool_bytes(fp, p.resident_layers, p.shuttle)
        assert sorted(p.resident_layers + p.streamed_layers) == list(range(c.n_layers))
        assert prev is None or p.bytes_streamed_per_pass <= prev
        prev = p.bytes_streamed_per_pass


def test_70b_under_24_gib_keeps_about_half_its_layers_spread_out():
    g = virtual_gguf("llama-70b:Q4_0")
    c = ModelConfig.from_gguf(g)
    p = place(Footprint.of(g, c, 4096), 24 * GiB)
    assert 38 <= len(p.resident_layers) <= 46 and not p.shuttle
    assert p.resident_layers[0] < 5 and p.resident_layers[-1] > 75


@pytest.mark.parametrize("spec", PRESETS)
def test_inspect_prints_the_placement_the_model_builds(spec, tmp_path):
    """`aircupy inspect --vram-budget` and CudaModel go through plan_model; for every preset and a
    range of budgets the printed plan is the placement, byte for byte (synthetic files of the preset's
    names and types, 3 layers each, written here)."""
    from aircupy.inspect import describe_plan
    from aircupy.synth import synth_model
    preset, qtype = spec.split(":")
    over = dict(TINY, sliding_window=8) if preset.startswith("gemma3") else TINY
    path = synth_model(tmp_path / "m.gguf", preset, qtype, n_layers=3, overrides=over, seed=1).path
    with GGUFFile(path) as g:
        c = ModelConfig.from_gguf(g)
        fp = Footprint.of(g, c, 256)
        low, high = minimum_budget(fp), fp.pool_plan(range(3), False, 3).total
        from aircupy.cuda.memory import OUTSIDE_RESERVE
        from aircupy.cuda.placement import ASSUMED_CONTEXT
        outside = ASSUMED_CONTEXT + OUTSIDE_RESERVE
        for budget in (np.linspace(low, high + 4096, 9) + outside).astype(int):
            model = plan_model(g, c, 256, int(budget), CudaOptions(), host_ram_bytes=8 * GiB,
                               outside_bytes=outside)
            shown = describe_plan(path, int(budget), n_ctx=256, host_ram_bytes=8 * GiB,
                                  measure_pcie=lambda: None)["plan"]
            assert json.loads(json.dumps(shown)) == json.loads(json.dumps(model.to_dict()))


def test_inspect_prints_the_plan(smollm2_path, monkeypatch):
    from click.testing import CliRunner

    from aircupy.cli import main
    monkeypatch.setattr("aircupy.cuda.pcie.measure_pcie_gbps", lambda: None)   # as without a GPU
    r = CliRunner().invoke(main, ["inspect", str(smollm2_path), "--vram-budget", "1000MB", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)["plan"]
    assert plan["vram_bytes"] + plan["outside_bytes"] <= 1_000_000_000 and plan["outside_bytes"] > 0
    assert plan["pool_budget"] == 1_000_000_000 - plan["outside_bytes"]
    assert plan["slots"] == 3 and plan["streamed_layers"]
    assert sorted(plan["resident_layers"] + plan["streamed_layers"]) == list(range(30))
    assert all(int(layer) in plan["streamed_layers"] and w[0] % 4096 == 0
               for layer, w in plan["windows"].items())
    human = CliRunner().invoke(main, ["inspect", str(smollm2_path), "--vram-budget", "1000MB"])
    assert human.exit_code == 0 and "streamed layers (" in human.output and "slots: 3 x" in human.output
    assert "assumed, not measured" in human.output and "for the CUDA context and libraries" in human.output


def test_inspect_budget_below_minimum_is_one_line(smollm2_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "aircupy", "inspect", str(smollm2_path), "--vram-budget",
                        "700MB"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "below the streaming minimum" in r.stderr
    assert "for the CUDA context and libraries" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_batching_model_keeps_its_kv_in_vram_when_it_fits(fp):
    """At a budget where one sequence streams the fewest bytes with the KV shuttled, a model that
    batches still takes the paged pool (the shuttle serves one sequence), and one that cannot fit the
    pool at all still gets the shuttle."""
    from dataclasses import replace
    solo, many = fp, replace(fp, max_seqs=8)
    top = solo.pool_plan(range(L), False, 3).total
    low = many.pool_plan((), False, 3).total       # the least a paged pool with 8 sequences needs
    budgets = [b for b in range(low, top, 1 << 14) if place(solo, b).shuttle]
    assert budgets, "no budget where one sequence is shuttled"
    p = place(many, budgets[-1])
    assert not p.shuttle and p.max_seqs == 8 and p.kv_tokens == many.kv_tokens
    assert place(many, minimum_budget(many)).shuttle      # nothing else fits: one sequence
