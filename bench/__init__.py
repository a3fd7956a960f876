"""Benchmarks and recorded results (the `promptmux bench` harness arrives with its own issue)."""
