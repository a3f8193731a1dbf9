"""BlockManager: allocation accounting, slot mapping, prefix sharing and reuse, eviction order, rollback,
and a seeded storm of random operations with the refcount and free-pool invariants checked after each."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from aircupy.engine.blocks import BlockManager, BlockTable, NoFreeBlocksError


def admitted(bm: BlockManager, tokens, computed: bool = True):
    """A table admitted for `tokens`; with computed=True its full blocks registered, as a scheduler
    does once the step that writes their KV is scheduled."""
    t = BlockTable()
    cached = bm.admit(t, tokens)
    if computed:
        bm.register_full(t, tokens, len(tokens))
    return t, cached


def test_rejects_bad_geometry():
    for bs in (0, 3, 12, True):
        with pytest.raises(ValueError):
            BlockManager(8, bs)
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_allocation_and_free_accounting():
    bm = BlockManager(8, 16)
    t, cached = admitted(bm, list(range(40)), computed=False)
    assert cached == 0 and len(t) == 3 and bm.num_used == 3 and bm.num_free == 5
    assert all(bm.ref_count(b) == 1 for b in t.ids)
    bm.grow(t, 48)
    assert len(t) == 3                          # position 47 is still in block 2
    bm.grow(t, 49)
    assert len(t) == 4 and bm.num_used == 4
    bm.free(t)
    assert t.ids == [] and bm.num_used == 0 and bm.num_free == 8
    bm.check()


def test_slot_mapping_is_block_times_size_plus_offset():
    bm = BlockManager(8, 4)
    other, _ = admitted(bm, [9, 9, 9], computed=False)           # takes block 0: t's blocks are not 0..2
    t, _ = admitted(bm, list(range(10)), computed=False)
    s = bm.slots(t, 2, 10)
    assert s.dtype == np.int32
    assert s.tolist() == [t.ids[p // 4] * 4 + p % 4 for p in range(2, 10)]
    assert bm.slots(t, 5, 5).tolist() == []


def test_admission_over_capacity_raises_and_leaves_no_trace():
    bm = BlockManager(4, 4)
    t = BlockTable()
    assert bm.blocks_to_admit(t, list(range(17))) == 5
    with pytest.raises(NoFreeBlocksError):
        bm.admit(t, list(range(17)))
    assert t.ids == [] and bm.num_used == 0
    bm.check()


def test_same_prompt_shares_full_blocks_and_recomputes_the_tail():
    bm = BlockManager(16, 16)
    prompt = list(range(100, 140))                              # 2 full blocks + 8 tokens
    a, ca = admitted(bm, prompt)
    b, cb = admitted(bm, prompt)
    assert (ca, cb) == (0, 32)
    assert b.ids[:2] == a.ids[:2] and b.ids[2] != a.ids[2]
    assert [bm.ref_count(x) for x in a.ids] == [2, 2, 1]
    assert bm.num_used == 4
    assert bm.stats()["prefix_hit_tokens"] == 32 and bm.stats()["prefix_query_tokens"] == 80
    bm.check()


def test_never_the_whole_prompt_is_cached():
    bm = BlockManager(16, 16)
    prompt = list(range(32))                                    # exactly two full blocks
    a, _ = admitted(bm, prompt)
    b, cb = admitted(bm, prompt)
    assert cb == 16                                             # block 1 holds the last token: recomputed
    assert b.ids[0] == a.ids[0] and b.ids[1] != a.ids[1]
    with pytest.raises(AssertionError):
        bm.slots(b, 0, 1, write=True)                           # the shared block is read-only


def test_unregistered_blocks_are_not_found():
    bm = BlockManager(16, 4)
    admitted(bm, list(range(12)), computed=False)               # KV not written yet: nothing to share
    _, cached = admitted(bm, list(range(12)))
    assert cached == 0


def test_hash_chains_the_prefix():
    bm = BlockManager(16, 4)
    admitted(bm, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert admitted(bm, [9, 9, 9, 9, 5, 6, 7, 8, 0])[1] == 0    # same block 1 after another block 0
    assert admitted(bm, [1, 2, 3, 4, 5, 6, 7, 9, 0])[1] == 4    # block 0 only


def test_next_turn_reuses_the_finished_sequence():
    bm = BlockManager(16, 4)
    turn1 = list(range(10)) + [50, 51, 52]                      # prompt + generated
    t, _ = admitted(bm, turn1)                                   # blocks 0..2 full, written
    bm.free(t)
    assert bm.num_used == 0 and bm.num_cached == 3
    turn2 = turn1 + [60, 61, 62, 63, 64]
    t2, cached = admitted(bm, turn2)
    assert cached == 12 and bm.evictions == 0 and bm.num_cached == 0
    bm.check()


def test_duplicate_block_stays_unregistered_and_frees_clean():
    bm = BlockManager(8, 4)
    a, _ = admitted(bm, list(range(9)), computed=False)
    b, _ = admitted(bm, list(range(9)), computed=False)           # both admitted before either computed
    bm.register_full(a, list(range(9)), 9)
    bm.register_full(b, list(range(9)), 9)
    assert [bm.is_registered(x) for x in a.ids] == [True, True, False]
    assert not any(bm.is_registered(x) for x in b.ids)
    bm.free(b)
    assert bm.num_cached == 0
    bm.check()


def test_clean_blocks_go_first_then_least_recently_freed_tail_first():
    bm = BlockManager(6, 2)
    a, _ = admitted(bm, [1, 1, 2, 2, 3])                         # 3 blocks, 2 registered
    b, _ = admitted(bm, [7, 7, 8, 8, 9])
    bm.free(a)                                                   # freed first: evicted first
    bm.free(b)
    assert bm.num_cached == 4 and bm.num_free == 6
    order = [a.hashes[1], a.hashes[0], b.hashes[1], b.hashes[0]]   # tail before head, a before b
    x = BlockTable()
    bm.grow(x, 4)                                                # the two clean blocks
    assert bm.evictions == 0 and bm.num_cached == 4
    for n, h in enumerate(order, start=1):
        bm.grow(x, 4 + 2 * n)
        assert bm.evictions == n and h not in bm._by_hash
        assert all(g in bm._by_hash for g in order[n:])
    bm.check()


def test_reviving_a_cached_block_counts_against_free_blocks():
    bm = BlockManager(4, 2)
    a, _ = admitted(bm, [1, 2, 3, 4, 5])
    bm.free(a)
    t = BlockTable()
    # 3 blocks: 2 revived from the cache + 1 new, all from the free pool
    assert bm.blocks_to_admit(t, [1, 2, 3, 4, 5]) == 3
    t2 = BlockTable()
    bm.admit(t2, [1, 2, 3, 4, 6])
    assert bm.blocks_to_admit(t, [1, 2, 3, 4, 5]) == 1           # now in use: shared, not taken


def test_truncate_releases_the_tail_and_unregisters_a_private_cut_block():
    bm = BlockManager(8, 4)
    tokens = list(range(14))
    t, _ = admitted(bm, tokens)                                  # blocks 0..2 full and registered
    assert bm.truncate(t, 10) == 10
    assert len(t) == 3 and not bm.is_registered(t.ids[2]) and bm.is_registered(t.ids[1])
    assert t.num_registered == 2 and bm.num_used == 3
    bm.slots(t, 10, 12, write=True)                              # the cut block is writable again
    assert bm.truncate(t, 8) == 8 and len(t) == 2
    bm.check()


def test_truncate_drops_a_shared_cut_block():
    bm = BlockManager(8, 4)
    tokens = list(range(14))
    a, _ = admitted(bm, tokens)
    b, cached = admitted(bm, tokens)
    assert cached == 12
    shared = b.ids[2]
    assert bm.truncate(b, 10) == 8                               # recompute positions 8, 9
    assert len(b) == 2 and bm.ref_count(shared) == 1 and bm.is_registered(shared)
    bm.grow(b, 10)
    bm.slots(b, 8, 10, write=True)
    bm.check()


def test_clear_cache_forgets_every_hash():
    bm = BlockManager(8, 4)
    a, _ = admitted(bm, list(range(9)))
    b, _ = admitted(bm, list(range(5)) + [99, 99, 99, 99])
    bm.free(b)
    bm.clear_cache()
    assert bm.num_cached == 0 and not any(bm.is_registered(x) for x in a.ids)
    assert admitted(bm, list(range(9)))[1] == 0
    bm.check()


def check_tables(bm: BlockManager, tables: dict[int, tuple[BlockTable, list[int], int]]):
    """Refcounts equal the number of tables holding a block; a block in two tables is registered, at
    the same index in both, over equal tokens whose KV both have."""
    bm.check()
    held = Counter(b for t, _, _ in tables.values() for b in t.ids)
    assert all(bm.ref_count(b) == held[b] for b in range(bm.num_blocks))
    assert bm.num_used == len(held) and bm.num_free + bm.num_used == bm.num_blocks
    B = bm.block_size
    where = {}
    for k, (t, toks, kv) in tables.items():
        assert len(set(t.ids)) == len(t.ids)
        for i, b in enumerate(t.ids):
            if held[b] > 1:
                assert bm.is_registered(b) and (i + 1) * B <= kv
                if b in where:
                    j, toks2 = where[b]
                    assert j == i and toks2[:(i + 1) * B] == toks[:(i + 1) * B]
                where[b] = (i, toks)


@pytest.mark.parametrize("seed", range(4))
def test_random_storm_keeps_the_invariants(seed):
    rng = random.Random(seed)
    bm = BlockManager(24, rng.choice([1, 2, 4]))
    B = bm.block_size
    stems = [[rng.randrange(5) for _ in range(20)] for _ in range(3)]
    tables: dict[int, tuple[BlockTable, list[int], int]] = {}     # key -> (table, tokens, KV written)
    for op in range(3000):
        r = rng.random()
        if r < 0.3 or not tables:
            toks = rng.choice(stems)[:rng.randrange(1, 20)] + [rng.randrange(5) for _ in range(rng.randrange(4))]
            t = BlockTable()
            if bm.blocks_to_admit(t, toks) <= bm.num_free:
                kv = bm.admit(t, toks)
                assert kv % B == 0 and kv < len(toks)
                tables[op] = (t, toks, kv)
        elif r < 0.55:                                           # compute every token, sample one more
            k = rng.choice(list(tables))
            t, toks, kv = tables[k]
            if bm.blocks_to_grow(t, len(toks)) <= bm.num_free:
                bm.grow(t, len(toks))
                bm.slots(t, kv, len(toks), write=True)
                bm.register_full(t, toks, len(toks))
                tables[k] = (t, toks + [rng.randrange(5)], len(toks))
        elif r < 0.7:                                            # rollback to n tokens
            k = rng.choice(list(tables))
            t, toks, kv = tables[k]
            n = rng.randrange(1, len(toks) + 1)
            m = min(kv, n - 1)
            kept = bm.truncate(t, m)
            assert kept in (m, m - m % B) and len(t) == bm.blocks_for(kept)
            tables[k] = (t, toks[:n], kept)
        else:
            t, _, _ = tables.pop(rng.choice(list(tables)))
            bm.free(t)
        check_tables(bm, tables)
    for t, _, _ in tables.values():
        bm.free(t)
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks
    assert bm.stats()["prefix_hit_tokens"] > 0 and bm.evictions > 0
