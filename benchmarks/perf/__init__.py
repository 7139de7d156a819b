"""The performance and scale benchmark (entry point: ``benchmarks/performance.py``), one
module per section plus the measurement and report helpers they share."""
