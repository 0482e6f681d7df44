"""Benchmark scripts of causalattn (run from the repository root: `python3 -m benchmarks.<name>`)."""
