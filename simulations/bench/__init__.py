"""Benchmarks that print figures (ratios against same-run baselines); not timed tests.

``python -m fedslm.simulations.bench <name> [--tiny] [--out PATH]``; see docs/benchmarks.md.
"""
