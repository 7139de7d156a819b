"""Flower 1.42 baseline for ``benchmarks/performance.py`` (runs in its own venv)."""
