"""Harness: many markets in one machine, baselines, sweeps and benchmarks."""
