"""Benchmarks: `python -m bench.<name> [--quick]` (see docs/benchmarks.md)."""
