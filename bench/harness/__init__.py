"""The `python -m bench` harness: scenarios (budget -> plan -> -ngl), models, measurement, peers,
records (CSV/JSON/markdown) and plots."""
