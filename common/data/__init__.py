"""A market's data and the evaluation contract: files, catalog, split, generated markets, metrics.

:mod:`~common.data.interactions` reads one market's file into a validated table;
:mod:`~common.data.catalog` maps item IDs to rows of the shared item table;
:mod:`~common.data.split` is the deterministic leave-one-out split with its seeded 99-negative
lists; :mod:`~common.data.markets` says where a federation's markets come from (files or
:mod:`~common.data.synthetic`); :mod:`~common.data.metrics` ranks a held-out item.
"""

__all__ = ["catalog", "interactions", "markets", "metrics", "split", "synthetic"]
