"""The metrics as a counting oracle: the server crafts item factors so that a market's hit rate counts its users.

The server chooses the item factors and Gram a market evaluates on. With two factors, every
item at ``(1, 0)`` and a target item X at ``(2, 0)``, every user's solved factor is
``(s_u, 0)`` with ``s_u > 0``, so X outranks every other item and every other item ties
(ties count against the held-out item): a user's validation item is in the top 10 exactly
when it is X. ``val-hr`` times the validation users is then the number of users whose
validation purchase is X, an exact count about a handful of people, and the Gram sent is
``YᵀY`` of the crafted table, so a consistency check cannot refuse it. One message, one query;
a reply carries several (``test-hr``, the ``received-`` metrics of a training message).

The attack is run twice against markets under DP at ε = 8: as regions are configured by
default (the answer: what a DP region sends), and against regions whose own node config chose
``dp-exact-metrics`` (to show that the attack itself works, so a zero above is the defence's).
An answer is exact when the reply's ``val-hr`` times the market's validation users is the true
count to 1e-6.
"""

from typing import Any

import numpy as np

from common.data.catalog import Catalog
from common.data.markets import load_file_split
from common.ials.core import ItemFactors
from common.ials.wire import pack_item_factors
from common.privacy.region import EXACT_METRICS_KEY
from simulations.attacks.federation import Regions, fedals_run_config, regions
from simulations.attacks.hostile import HostileServer, MarketRefused
from simulations.attacks.settings import AttackSettings

EPSILON = 8.0  # the budget of the attacked markets


def crafted_table(num_items: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row ``(1, 0)``, row ``target`` ``(2, 0)``; and the table's Gram (module docstring)."""
    factors = np.zeros((num_items, 2), dtype=np.float32)
    factors[:, 0] = 1.0
    factors[target, 0] = 2.0
    return factors, factors.astype(np.float64).T @ factors.astype(np.float64)


def _queries(regions_: Regions, catalog: Catalog, settings: AttackSettings, per_market: int) -> dict[str, list]:
    """Per market, its validation users' count and the (item, true count) of its most common validation items."""
    out = {}
    for market, config in zip(regions_.markets, regions_.node_configs, strict=True):
        split = load_file_split(config["data-path"], market, catalog, settings.seed)
        held_out = split.valid.candidates[:, 0]
        items, counts = np.unique(held_out, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:per_market]
        out[market] = [len(held_out), [(int(items[i]), int(counts[i])) for i in order]]
    return out


def _ask(server: HostileServer, node: int, factors: np.ndarray, gram: np.ndarray) -> dict[str, Any]:
    rows = np.arange(len(factors), dtype=np.int64)
    try:
        return server.metrics(
            node,
            "evaluate",
            pack_item_factors(ItemFactors(rows, factors), gram, len(rows)),
            {"server-round": 1, "training-id": "oracle"},
        )
    except MarketRefused as error:
        return {"refused": str(error)}


def _run(server: HostileServer, queries: dict[str, list], num_items: int) -> dict[str, Any]:
    exact, asked, markets = 0, 0, {}
    for node, (market, (validation_users, targets)) in enumerate(queries.items()):
        answers = []
        for target, truth in targets:
            metrics = _ask(server, node, *crafted_table(num_items, target))
            asked += 1
            answer = metrics.get("val-hr")
            hit = answer is not None and abs(answer * validation_users - truth) < 1e-6
            exact += int(hit)
            answers.append(
                {
                    "row": target,
                    "true-count": truth,
                    "answer": None if answer is None else answer * validation_users,
                    "keys-sent": sorted(metrics),
                }
            )
        markets[market] = answers
    return {"exact-answers": exact, "queries": asked, "markets": markets}


def attack(settings: AttackSettings) -> dict[str, Any]:
    """The oracle against DP markets as configured by default, and against regions that opted in to exact metrics."""
    federation = regions(settings, "counting-oracle", users=200 if settings.quick else 600)
    catalog = Catalog.load(federation.catalog_path)
    run_config = fedals_run_config(settings, **{"dp-epsilon": EPSILON, "als-factors": 2})
    queries = _queries(federation, catalog, settings, 3 if settings.quick else 10)
    defended = _run(federation.server(run_config), queries, catalog.size)
    opted_in = _run(federation.server(run_config, **{EXACT_METRICS_KEY: True}), queries, catalog.size)
    return {
        "epsilon": EPSILON,
        "exact-answers": defended["exact-answers"],
        "queries": defended["queries"],
        "region-opted-in-to-exact-metrics": {
            "exact-answers": opted_in["exact-answers"],
            "queries": opted_in["queries"],
        },
        "markets": defended["markets"],
    }
