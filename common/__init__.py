"""The Flower-free bottom layer every other package builds on: data, models, privacy, serving.

Subpackages group the code by concept (:mod:`common.data`, :mod:`common.neural`,
:mod:`common.ials`, :mod:`common.privacy`, :mod:`common.serving`, :mod:`common.runtime`); the
modules directly here are the few every stack shares: :mod:`common.config` (typed parsing of
run and node config values), :mod:`common.methods` (the registry of methods),
:mod:`common.run_config` (the one run-config model every side reads), :mod:`common.selection`
(the one rule that picks the best round on validation) and :mod:`common.protocol` (the wire
contract: every key the ServerApp and the markets' ClientApps exchange). Nothing here imports Flower
(``tests/xmfl/test_packaging.py`` checks it), so a region's serving needs no federation runtime.
"""

__all__ = [
    "config",
    "data",
    "ials",
    "run_config",
    "methods",
    "neural",
    "privacy",
    "protocol",
    "runtime",
    "selection",
    "serving",
]
