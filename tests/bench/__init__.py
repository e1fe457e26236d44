"""Benchmarks: run from the repository root as `python -m tests.bench.<name>`; outside the wheel, importing stem_cli."""
