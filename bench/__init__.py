"""Benchmarks (see BENCHMARKS.md for commands and results)."""
