"""aircupy's benchmarks. `python -m bench` (bench/__main__.py) runs the issue-7 scenarios for aircupy and
its peers in one session and writes CSV/JSON/markdown/PNG results; the bench_*.py scripts are the
single-purpose benchmarks it reuses (each still runs on its own: python bench/bench_resident.py ...).
"""
