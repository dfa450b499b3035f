"""Resetting a region's budget through δ: spend it at a small δ, then re-read the spending at a large one.

A region caps ε in its node config but leaves δ to the run. A first training at δ = 1e-6
spends the cap; a second training asks for δ = 0.3. Read at δ = 0.3, the spending looks
small, and a market that re-reads its ledger at the run's δ buys fresh releases. The ledger
now keeps its budget period's δ (recorded at the first release) and a later run can only
lower it (:func:`clients.privacy_state.period_delta`).

Reported per market: releases the second training made with data (num-examples > 0), and the
lifetime ε of all the ledger's releases read by Google's dp_accounting at the first δ; the
budget holds if it stays within the cap.
"""

from typing import Any

import dp_accounting
import numpy as np

from clients.local_model import config_from_context
from clients.privacy_state import MarketPrivacy
from common.data.catalog import Catalog
from common.ials.model import initial_rows
from common.ials.wire import INITIAL_ROWS_KEY
from simulations.attacks.federation import fedals_run_config, regions
from simulations.attacks.hostile import HostileServer, MarketRefused
from simulations.attacks.settings import AttackSettings

EPSILON, FIRST_DELTA, ASKED_DELTA = 2.0, 1e-6, 0.3


def lifetime_epsilon(multipliers: list[float], delta: float) -> float:
    """ε of Gaussian releases of sensitivity 1 at sample rate 1, by dp_accounting's RDP accountant."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for sigma in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    return float(accountant.get_epsilon(delta))


def _training(server: HostileServer, gram: np.ndarray, training_id: str, rounds: int) -> list[int]:
    """``rounds`` round-1-style train messages to every market; per market, the releases with data."""
    made = []
    for node in range(len(server.contexts)):
        count = 0
        for server_round in range(1, rounds + 1):
            try:
                _, metrics = server.arrays(
                    node,
                    "train",
                    {"gram": gram.astype(np.float32)},
                    {"server-round": server_round, "training-id": training_id, INITIAL_ROWS_KEY: True},
                )
            except MarketRefused:
                continue
            count += int(metrics.get("num-examples", 0) > 0)
        made.append(count)
    return made


def attack(settings: AttackSettings) -> dict[str, Any]:
    """Spend the cap at δ 1e-6, then ask for δ 0.3 in a new training; what the second one bought."""
    rounds = 3 if settings.quick else 10
    federation = regions(settings, "delta-reset", users=150 if settings.quick else 600)
    catalog = Catalog.load(federation.catalog_path)
    first = fedals_run_config(
        settings,
        **{
            "dp-epsilon": EPSILON,
            "dp-delta": FIRST_DELTA,
            "als-factors": 8,
            "dp-accountant": "rdp",
            "num-server-rounds": rounds,
        },
    )
    server = federation.server(first, **{"dp-epsilon": str(EPSILON)})
    initial = initial_rows(np.arange(catalog.size), config_from_context(server.contexts[0]).ials_config())
    gram = initial.factors.T @ initial.factors
    _training(server, gram, "first", rounds)
    for context in server.contexts:
        context.run_config.update({"dp-delta": ASKED_DELTA})
    fresh = _training(server, gram, "second", rounds)
    markets = {}
    for node, context in enumerate(server.contexts):
        market = str(context.node_config["market"])
        ledger = MarketPrivacy(context, market).load().ledger
        multipliers = list(ledger.releases) + [s for s, rate, steps in ledger.history for _ in range(steps)]
        markets[market] = {
            "fresh-releases": fresh[node],
            "ledger-delta": ledger.budget.delta,
            "lifetime-epsilon-at-first-delta": lifetime_epsilon(multipliers, FIRST_DELTA),
        }
    return {
        "epsilon-cap": EPSILON,
        "first-delta": FIRST_DELTA,
        "asked-delta": ASKED_DELTA,
        "fresh-releases": sum(m["fresh-releases"] for m in markets.values()),
        "most-lifetime-epsilon-at-first-delta": max(m["lifetime-epsilon-at-first-delta"] for m in markets.values()),
        "markets": markets,
    }
