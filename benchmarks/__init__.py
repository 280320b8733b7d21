"""Reproducible speed and memory figures: `scripts/bench` (or `python -m benchmarks`)."""
