"""CPU tier: the streamed model's placement (which layers stay resident) against exact pool arithmetic."""
from __future__ import annotations

import pytest

from aircupy.cuda.pool import fmt_bytes
from aircupy.cuda.plan import PlanError, PlanSettings, make_plan, resident_set

TINY = dict(vocab=512, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
L = 12


@pytest.fixture(scope="module")
def placement(tmp_path_factory):
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile
    from aircupy.stream.manifest import build_manifest
    from aircupy.cuda.placement import StreamPlacement
    from aircupy.synth import synth_model
    rep = synth_model(tmp_path_factory.mktemp("m") / "m.gguf", "llama3-8b", "Q4_0", n_layers=L,
                      overrides=TINY, seed=3)
    g = GGUFFile(rep.path)
    c = ModelConfig.from_gguf(g)
    sp, _, _ = StreamPlacement.for_model(g, c, 64, 64, 3)
    yield sp, build_manifest(g), c
    g.close()


def test_resident_set_matches_make_plan_spread(placement):
    sp, manifest, c = placement
    for budget_n in (0, 4, 9):
        budget = sp.total(budget_n)
        plan = make_plan(manifest, c, budget, PlanSettings(n_ctx=64, prefill_chunk=64))
        n = len(plan.resident_layers)
        assert tuple(plan.resident_layers) == tuple(resident_set(L, n))


def test_choose_is_the_most_resident_layers_that_fit(placement):
    sp, _, _ = placement
    totals = [sp.total(n) for n in range(L + 1)]
    # more resident layers cost more, except all-resident, which needs no slots and no staging
    assert totals[:L] == sorted(totals[:L]) and totals[0] < totals[L] <= totals[L - 1]
    for n in range(L + 1):
        for budget in (totals[n], totals[n] + 100):   # exactly the pool, and just above it
            res, shuttle = sp.choose(budget, shuttle=False)
            best = max(k for k in range(L + 1) if totals[k] <= budget)
            assert len(res) == best and sp.pool_plan(res).total <= budget and not shuttle
            # automatic: KV in VRAM fits here, and a layer's weights outweigh its KV (n_ctx 64)
            assert sp.choose(budget) == (res, False)


def test_slots_and_staging_regions(placement):
    sp, _, _ = placement
    pp = sp.pool_plan(resident_set(L, 5))
    slots = [r for r in pp.regions if r.startswith("stream.slot")]
    assert len(slots) == 3 and {"stream.staging0", "stream.staging1"} <= set(pp.regions)
    assert pp.regions["stream.slot0"].nbytes == max(lay.nbytes for lay in sp.layer_ls)
    assert not any(r.startswith("stream.") for r in sp.pool_plan(range(L)).regions)


def test_below_streaming_minimum_is_one_line_error(placement):
    sp, _, _ = placement
    low = sp.total(0, shuttle=True)
    for shuttle in (None, True):
        with pytest.raises(PlanError) as e:
            sp.choose(low - 1, shuttle=shuttle)
        msg = str(e.value)
        assert "minimum" in msg and "\n" not in msg and "shuttled" in msg
        assert fmt_bytes(low) in msg
    with pytest.raises(PlanError, match="in VRAM, the shuttle off"):
        sp.choose(sp.total(0) - 1, shuttle=False)


@pytest.fixture(scope="module")
def long_ctx(placement, tmp_path_factory):
    """The same model with an 8k-token context: one layer's KV (4 MiB) outweighs its weights."""
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.placement import StreamPlacement
    from aircupy.synth import synth_model
    rep = synth_model(tmp_path_factory.mktemp("m") / "m.gguf", "llama3-8b", "Q4_0", n_layers=L,
                      overrides=TINY, seed=3)
    g = GGUFFile(rep.path)
    c = ModelConfig.from_gguf(g)
    sp, _, _ = StreamPlacement.for_model(g, c, 8192, 64, 3)
    yield sp, c
    g.close()


def test_shuttle_regions_and_arithmetic(long_ctx):
    sp, c = long_ctx
    kv_b = 2 * c.n_head_kv * 8192 * c.head_dim * 2
    for n in (0, 5, L - 2):
        res = resident_set(L, n)
        vram, sh = sp.pool_plan(res), sp.pool_plan(res, shuttle=True)
        assert vram.regions["kv"].nbytes == L * kv_b
        n_slots = min(3, L - n)
        kvslots = [r for r in sh.regions if r.startswith("stream.kvslot")]
        assert len(kvslots) == n_slots and all(sh.regions[r].nbytes == kv_b for r in kvslots)
        assert sh.regions["kv"].nbytes == n * kv_b if n else "kv" not in sh.regions
        assert vram.total - sh.total == (L - n - n_slots) * kv_b
        assert sp.bytes_per_pass(n, True) - sp.bytes_per_pass(n, False) == 2 * (L - n) * kv_b
    # all resident: nothing streams, so no shuttle
    assert sp.pool_plan(range(L), shuttle=True).regions.keys() == sp.pool_plan(range(L)).regions.keys()


def test_choose_takes_the_shuttle_when_kv_in_vram_does_not_fit(long_ctx):
    sp, c = long_ctx
    vram0, sh0 = sp.total(0), sp.total(0, shuttle=True)
    assert sh0 < vram0
    for budget in (sh0, (sh0 + vram0) // 2, vram0 - 1):
        res, shuttle = sp.choose(budget)
        assert shuttle and sp.pool_plan(res, True).total <= budget
        assert len(res) == max(n for n in range(L) if sp.total(n, True) <= budget)
    # Once KV in VRAM fits, it streams fewer bytes here (a shuttled layer moves 2 x 4 MiB of KV to
    # save a few hundred KiB of weights), so the automatic choice keeps it
    assert sp.choose(vram0) == (sp.resident_for(0), False)
    assert sp.choose(vram0, shuttle=True)[1]
    with pytest.raises(PlanError):
        sp.choose(vram0 - 1, shuttle=False)


def test_make_plan_and_choose_agree_on_the_kv_placement(long_ctx, placement):
    """Where make_plan's estimate places a budget clearly inside one placement's range, the exact
    pool picks the same placement."""
    sp, c = long_ctx
    _, manifest, _ = placement
    st = PlanSettings(n_ctx=8192, prefill_chunk=64)
    seen = set()
    for budget in range(sp.total(0, True), sp.total(L) + (8 << 20), 1 << 20):
        try:
            plan = make_plan(manifest, c, budget, st)
        except PlanError:
            continue
        res, shuttle = sp.choose(budget)
        if abs(len(res) - len(plan.resident_layers)) <= 1:
            assert shuttle == (plan.kv_placement == "shuttle"), (budget, plan.kv_placement)
            seen.add(plan.kv_placement)
    assert seen == {"vram", "shuttle"}
