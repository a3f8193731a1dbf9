"""bench/bench_prefill_graphs.py on the CPU: every timed prefill gets its own prompt, and eager and
graphed runs see the same sequence of prompts (a replayed graph is never timed on its capture's ids)."""
from __future__ import annotations

import numpy as np

from bench.bench_prefill_graphs import prompt, timed_varied


def test_each_run_gets_its_own_prompt_and_both_modes_the_same_ones():
    seen = {"eager": [], "graph": []}
    for calls in seen.values():
        median, seeds = timed_varied(lambda ids, calls=calls: calls.append(ids.copy()), 49152, 512, 5)
        assert median >= 0 and seeds == [1, 2, 3, 4, 5]
    eager, graph = seen["eager"], seen["graph"]
    assert len(eager) == 6                                   # warm-up + 5 timed
    assert all(a.dtype == np.int32 and a.shape == (512,) and 0 <= a.min() and a.max() < 49152
               for a in eager)
    assert len({a.tobytes() for a in eager}) == 6            # no two runs share a prompt
    assert all(np.array_equal(a, b) for a, b in zip(eager, graph))
    assert np.array_equal(eager[3], prompt(49152, 512, 3))   # run k's prompt is seed k's
    assert not np.array_equal(prompt(49152, 512, 6), eager[0])   # the check prompt (reps + 1) is new
