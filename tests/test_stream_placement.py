"""CPU tier: the streamed model's placement (which layers stay resident) against exact pool arithmetic."""
from __future__ import annotations

import pytest

from aircupy.loader.plan import PlanError, PlanSettings, make_plan, resident_set

TINY = dict(vocab=512, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
L = 12


@pytest.fixture(scope="module")
def placement(tmp_path_factory):
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile
    from aircupy.loader.manifest import build_manifest
    from aircupy.model.stream_placement import StreamPlacement
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
    sp, manifest, c = placement
    totals = [sp.total(n) for n in range(L + 1)]
    # more resident layers cost more, except all-resident, which needs no slots and no staging
    assert totals[:L] == sorted(totals[:L]) and totals[0] < totals[L] <= totals[L - 1]
    for n in range(L + 1):
        for budget in (totals[n], totals[n] + 100):   # exactly the pool, and just above it
            plan = make_plan(manifest, c, budget, PlanSettings(n_ctx=64, prefill_chunk=64))
            res = sp.choose(budget, plan)
            best = max(k for k in range(L + 1) if totals[k] <= budget)
            assert len(res) == best and sp.pool_plan(res).total <= budget


def test_slots_and_staging_regions(placement):
    sp, _, _ = placement
    pp = sp.pool_plan(resident_set(L, 5))
    slots = [r for r in pp.regions if r.startswith("stream.slot")]
    assert len(slots) == 3 and {"stream.staging0", "stream.staging1"} <= set(pp.regions)
    assert pp.regions["stream.slot0"].nbytes == max(lay.nbytes for lay in sp.layer_ls)
    assert not any(r.startswith("stream.") for r in sp.pool_plan(range(L)).regions)


def test_below_streaming_minimum_is_one_line_error(placement):
    sp, _, _ = placement
    with pytest.raises(PlanError) as e:
        sp.choose(sp.total(0) - 1, None)
    msg = str(e.value)
    assert "minimum" in msg and "\n" not in msg and "shuttle is not implemented" in msg
