"""Benchmarks and research runs that take longer than a test, each printing what it measured beside a reference.

:mod:`~simulations.benchmarks.command` is ``xmfl benchmark`` (quality, scale, dp-*, latency, join,
continue, attacks); :mod:`~simulations.benchmarks.privacy_sweep` (with its figure,
:mod:`~simulations.benchmarks.privacy_plot`) is ``xmfl privacy-sweep``;
:mod:`~simulations.benchmarks.ials_tuning` is ``xmfl ials-tuning``; the others are the
benchmarks the command runs.
"""

__all__ = [
    "command",
    "continue_benchmark",
    "ials_tuning",
    "join_benchmark",
    "latency",
    "memory",
    "privacy_plot",
    "privacy_sweep",
    "scale_benchmark",
    "users_sweep",
]
