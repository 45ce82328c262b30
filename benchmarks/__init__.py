"""Benchmarks, the demo and their reports (may import every package of the project)."""
