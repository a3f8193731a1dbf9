"""CPU tier: bench/plot_batch.py reads llama-batched-bench's table and the JSONL records it plots."""
from __future__ import annotations

import json

from bench.plot_batch import read_peer, read_records

PEER = """main: n_kv_max = 32768, n_batch = 2048
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |    128 |    1 |    160 |    0.023 |  1376.88 |    0.149 |   858.13 |    0.172 |   928.06 |
|    32 |    128 |   64 |  10240 |    0.051 | 40252.36 |    0.686 | 11937.27 |    0.737 | 13891.66 |
llama_perf_context_print: total time = 1.0 ms
"""


def test_read_peer_takes_the_table_rows_only(tmp_path):
    p = tmp_path / "peer.log"
    p.write_text(PEER)
    rows = read_peer(p)
    assert rows == [dict(parallel=1, s_pp=1376.88, s_tg=858.13, t_pp=0.023),
                    dict(parallel=64, s_pp=40252.36, s_tg=11937.27, t_pp=0.051)]


def test_read_records_skips_blank_lines(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"streams": 1}) + "\n\n" + json.dumps({"streams": 8}) + "\n")
    assert [r["streams"] for r in read_records(p)] == [1, 8]
