"""Plots of batched decode against concurrency: aggregate tokens/s and time to first token, aircupy
(bench_batch / bench_serve JSONL records) beside llama.cpp's llama-batched-bench (its log's table).

    python -m bench.plot_batch --aircupy batch_smollm2.jsonl --peer peer-smollm2.log \\
        [--serve serve_smollm2.jsonl] --title "SmolLM2-135M Q4_1, H200" --out smollm2.png

Pure parsing is separate from drawing (read_records, read_peer), so the CPU tier tests it; matplotlib
is imported only to draw.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_records(path) -> list[dict]:
    """One dict per non-empty line of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_peer(path) -> list[dict]:
    """llama-batched-bench's table rows as dicts: parallel count B, generation tokens/s S_TG, prompt
    tokens/s S_PP, and the prompt time T_PP (the time every sequence waits for its first token)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or not cells[2].isdigit():
            continue
        rows.append(dict(parallel=int(cells[2]), s_pp=float(cells[5]), s_tg=float(cells[7]),
                         t_pp=float(cells[4])))
    return rows


def draw(aircupy: list[dict], peer: list[dict], serve: list[dict], title: str, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a = sorted(aircupy, key=lambda r: r["streams"])
    ax1.plot([r["streams"] for r in a], [r["decode_tok_s"] for r in a], "o-", label="aircupy (scheduler loop)")
    if serve:
        s = sorted(serve, key=lambda r: r["clients"])
        ax1.plot([r["clients"] for r in s], [r["tok_s"] for r in s], "s--", label="aircupy serve (HTTP)")
        ax2.plot([r["clients"] for r in s], [r["ttft_p50"] * 1e3 for r in s], "s--", label="aircupy serve p50")
    if peer:
        p = sorted(peer, key=lambda r: r["parallel"])
        ax1.plot([r["parallel"] for r in p], [r["s_tg"] for r in p], "^-", label="llama.cpp batched-bench S_TG")
        ax2.plot([r["parallel"] for r in p], [r["t_pp"] * 1e3 for r in p], "^-", label="llama.cpp T_PP (all prompts)")
    ax2.plot([r["streams"] for r in a], [r["ttft_p50"] * 1e3 for r in a], "o-", label="aircupy loop p50")
    for ax, ylabel in ((ax1, "aggregate decode tokens/s"), (ax2, "time to first token, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sequences")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aircupy", required=True)
    ap.add_argument("--peer", default=None)
    ap.add_argument("--serve", default=None)
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = draw(read_records(a.aircupy), read_peer(a.peer) if a.peer else [],
               read_records(a.serve) if a.serve else [], a.title, Path(a.out))
    print(out)


if __name__ == "__main__":
    main()
