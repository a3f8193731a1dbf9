"""PNG plots from records: tokens/s against VRAM budget (prefill and decode, one line per engine, per
model), and achieved PCIe GB/s against the measured pinned host->device bound.

matplotlib is imported lazily and is not a dependency: without it, plot() returns a note and no files.
"""
from __future__ import annotations

from pathlib import Path


def _series(records, model: str, metric: str, engine: str) -> list[tuple[float, float]]:
    """(budget GiB, value) points; a resident scenario (no budget) sits at the largest budget seen."""
    rows = [r for r in records if r["model"] == model and r["metric"] == metric and r["engine"] == engine
            and r["value"] is not None]
    budgets = [float(r["budget_bytes"]) for r in records if r["model"] == model
               and r.get("budget_bytes") not in (None, "")]
    top = max(budgets, default=0.0)
    pts = [((float(r["budget_bytes"]) if r.get("budget_bytes") not in (None, "") else top) / 2**30,
            float(r["value"])) for r in rows]
    return sorted(pts)


def plot(records: list[dict], out: Path) -> tuple[list[Path], str | None]:
    """Write the plots into `out`; returns (files, note). note is set when nothing could be drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not importable"
    files = []
    engines = sorted({r["engine"] for r in records if r["value"] is not None})
    models = sorted({r["model"] for r in records if r.get("budget_bytes") not in (None, "")})
    for model in models:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        drawn = False
        for ax, (metric, title) in zip(axes, (("prefill_512_tps", "prefill 512"),
                                              ("prefill_2048_tps", "prefill 2048"),
                                              ("decode_tps", "decode, batch 1"))):
            for eng in engines:
                pts = _series(records, model, metric, eng)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=eng)
                    drawn = True
            ax.set(title=f"{model}: {title}", xlabel="VRAM budget (GiB)", ylabel="tokens/s")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        if drawn:
            p = out / f"tps_vs_budget_{model.replace(':', '_')}.png"
            fig.tight_layout()
            fig.savefig(p, dpi=110)
            files.append(p)
        plt.close(fig)
    pcie = [r for r in records if r["metric"] in ("pcie_decode_GBps", "pcie_prefill_GBps")
            and r["value"] is not None]
    bound = [float(r["value"]) for r in records if r["metric"] == "pcie_pinned_GBps" and r["value"]]
    if pcie:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        labels = sorted({r["scenario"] for r in pcie}, key=[r["scenario"] for r in pcie].index)
        x = {s: i for i, s in enumerate(labels)}
        for metric, dx, name in (("pcie_prefill_GBps", -0.18, "prefill 2048"),
                                 ("pcie_decode_GBps", 0.18, "decode")):
            pts = [(x[r["scenario"]] + dx, float(r["value"])) for r in pcie if r["metric"] == metric]
            if pts:
                ax.bar([p[0] for p in pts], [p[1] for p in pts], width=0.36, label=name)
        if bound:
            ax.axhline(max(bound), color="k", ls="--", label=f"pinned H2D, measured ({max(bound):.1f})")
        ax.set_xticks(range(len(labels)), labels, rotation=15)
        ax.set(ylabel="GB/s (bytes / copy-stream busy time)", title="aircupy: achieved PCIe vs bound")
        ax.legend()
        fig.tight_layout()
        p = out / "pcie_vs_bound.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)
    return files, None if files else "plots skipped: no budgeted or streamed figures to draw"
