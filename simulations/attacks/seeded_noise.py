"""Removing DP noise that a run config seeded: the server regenerates it and subtracts it.

A run config once could ask every market to draw its DP noise from the run's seed
(``dp-insecure-seeded-noise``); whoever wrote the config then knows the seed, the market's
name and the round, regenerates the noise and subtracts it from the release. The setting is
now the region's own (its node config, :mod:`common.privacy.region`): the attack asks for it through
the run config, and against regions whose node config chose it, to show that it works there.

The score is the residual's size relative to the noise: the released sums minus the
regenerated noise, against the same sums without noise (computed here from the market's data,
as only a test can). About 1: the noise stays; about 0: it was removed.
"""

from typing import Any

import numpy as np

from clients.local_model import config_from_context
from clients.privacy_state import MarketPrivacy, region_policy, training_noise_seed
from common.data.catalog import Catalog
from common.data.markets import load_file_split
from common.ials.dp import ReleaseConfig, block_noise_multipliers, noise_generator, private_release
from common.ials.model import IALSMarket, initial_rows
from common.ials.steps import solve_users
from common.ials.wire import INITIAL_ROWS_KEY
from common.privacy.region import SEEDED_NOISE_KEY, RegionPolicy, public_assortment
from simulations.attacks.federation import fedals_run_config, regions
from simulations.attacks.hostile import HostileServer, MarketRefused
from simulations.attacks.settings import AttackSettings

EPSILON, DELTA = 2.0, 1e-6  # the region's ceilings in its node config


def _residual(server: HostileServer, node: int, num_items: int) -> dict[str, Any]:
    """One round-1 release of market ``node`` and how much of its noise the attacker's regeneration removes."""
    context = server.contexts[node]
    market_name = str(context.node_config["market"])
    config = config_from_context(context)
    initial = initial_rows(np.arange(num_items), config.ials_config())
    gram = initial.factors.T @ initial.factors  # round 1: the Gram of the seeded table
    try:
        sent, _ = server.arrays(
            node,
            "train",
            {"gram": gram.astype(np.float32)},
            {"server-round": 1, "training-id": "seeded", INITIAL_ROWS_KEY: True},
        )
    except MarketRefused as error:
        return {"refused": str(error)}
    # The attacker: regenerate the noise a seeded market draws, from what the run config says.
    seeded = RegionPolicy(insecure_seeded_noise=True)
    ledger = MarketPrivacy(context, market_name).load().ledger
    sigma_sums, _ = block_noise_multipliers(ledger.noise_multiplier, ReleaseConfig())
    generator = noise_generator(training_noise_seed(seeded, config, market_name, 1))
    regenerated = generator.normal(0.0, sigma_sums * np.sqrt(ReleaseConfig().items_per_user), sent["sums"].shape)
    # The scorer: the same release without noise, from the market's own data.
    catalog = Catalog.load(context.node_config["catalog-path"])
    split = load_file_split(context.node_config["data-path"], market_name, catalog, config.seed)
    market = IALSMarket.from_split(split, config.history_length)
    ials = config.ials_config()
    users = solve_users(market.train, initial_rows(split.market_items, ials), gram, catalog.size, ials)
    clean = private_release(
        market.train, users, public_assortment(region_policy(context, market_name), catalog), 0.0, noise_generator(0)
    )["sums"]
    noise_std = float(np.std(sent["sums"] - clean))
    residual = float(np.std(sent["sums"] - regenerated - clean))
    calibrated = sigma_sums * np.sqrt(ReleaseConfig().items_per_user)  # what the ledger paid for
    return {
        "noise-std": noise_std,
        "calibrated-noise-std": float(calibrated),
        "residual-std": residual,
        "removed": residual < 0.01 * noise_std,
    }


def _run(server: HostileServer, num_items: int) -> dict[str, Any]:
    markets = {str(c.node_config["market"]): _residual(server, n, num_items) for n, c in enumerate(server.contexts)}
    return {
        "noise-removed-markets": sum(int(m.get("removed", False)) for m in markets.values()),
        "markets-attacked": len(markets),
        "markets": markets,
    }


def attack(settings: AttackSettings) -> dict[str, Any]:
    """Ask for seeded noise through the run config; then against regions that chose it themselves."""
    federation = regions(settings, "seeded-noise", users=150 if settings.quick else 600)
    catalog = Catalog.load(federation.catalog_path)
    run_config = fedals_run_config(
        settings, **{"dp-epsilon": EPSILON, "dp-delta": DELTA, "als-factors": 8, SEEDED_NOISE_KEY: True}
    )
    ceilings = {"dp-epsilon": str(EPSILON), "dp-delta": str(DELTA)}
    asked = _run(federation.server(run_config, **ceilings), catalog.size)
    federation = regions(settings, "seeded-noise", users=150 if settings.quick else 600)  # fresh ledgers
    chosen = _run(federation.server(run_config, **ceilings, **{SEEDED_NOISE_KEY: "true"}), catalog.size)
    return {
        "asked-by-run-config": {
            "noise-removed-markets": asked["noise-removed-markets"],
            "markets-attacked": asked["markets-attacked"],
        },
        "region-chose-seeded-noise": {
            "noise-removed-markets": chosen["noise-removed-markets"],
            "markets-attacked": chosen["markets-attacked"],
        },
        "markets": {"asked-by-run-config": asked["markets"], "region-chose-seeded-noise": chosen["markets"]},
    }
