"""Benchmarks: what `freesolo bench` / `make bench` runs, and their reports (may import every package)."""
