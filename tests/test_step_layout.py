"""CPU tier: the CUDA batch step's pure parts: attention launches per step, the step buffer layout,
decode-graph buckets, and the placement of a batching pool (cuda/kv.py, cuda/buffers.py, cuda/batch.py)."""
from __future__ import annotations

import numpy as np

from aircupy.cuda.batch import DECODE_BUCKETS, bucket
from aircupy.cuda.buffers import StepLayout
from aircupy.cuda.kv import attention_segments


def test_segments_group_short_chunks_and_isolate_prompts():
    # 3 decode rows, a 20-row prompt, a 2-row chunk, a 9-row prompt, a decode row
    qs = np.cumsum([0, 1, 1, 1, 20, 2, 9, 1])
    assert attention_segments(qs, 8) == [(0, 3, "decode"), (3, 23, "prefill"), (23, 25, "decode"),
                                         (25, 34, "prefill"), (34, 35, "decode")]
    assert attention_segments(np.array([0, 1, 2]), 8) == [(0, 2, "decode")]
    assert attention_segments(np.array([0, 512]), 8) == [(0, 512, "prefill")]
    # segments tile the rows in order
    segs = attention_segments(qs, 8)
    assert [s[0] for s in segs[1:]] == [s[1] for s in segs[:-1]] and segs[0][0] == 0 and segs[-1][1] == qs[-1]


def test_step_layout_parts_do_not_overlap():
    lay = StepLayout(rows=512, seqs=64, max_blocks=128)
    spans = sorted((off, off + int(np.prod(shape))) for off, shape in lay.parts().values())
    assert spans[0][0] == 0 and spans[-1][1] == lay.size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    v = lay.views(np.zeros(lay.size, np.int32))
    assert v["tables"].shape == (64, 128) and v["rng"].dtype == np.uint32 and v["sparams"].dtype == np.float32
    v["sparams"][3] = (0.5, 40, 0.9, 0.05)
    assert v["sparams"][3, 1] == 40.0 and v["ids"].base is not None


def test_buckets():
    assert [bucket(n, 256) for n in (1, 2, 3, 5, 9, 33, 200, 256)] == [1, 2, 4, 8, 16, 48, 256, 256]
    assert bucket(65, 64) is None and bucket(64, 64) == 64
    assert list(DECODE_BUCKETS) == sorted(DECODE_BUCKETS)
