"""Benchmarks: print figures and rewrite BENCHMARKS.md (``python -m bench [--quick]``)."""
