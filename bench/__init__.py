"""Benchmark: the action against the by-hand recipe, on the same checkpoint, Hub, registry and machine.

Run it with `bench/run` (see docs/benchmark.md).
"""
