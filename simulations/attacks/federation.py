"""The regions an attack runs against, set up as deployed SuperNodes would be.

Each market gets what its operator would give its SuperNode: its own interaction file, the
company catalog, a state directory for its lifetime ledger, and its own policy keys
(:mod:`common.privacy.region`). Generated markets are written to files first, so the market reads
its data the way a deployed region does.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data.interactions import discover_market_files
from common.data.markets import MarketSource
from common.data.synthetic import SyntheticConfig, write_markets
from simulations import run as harness
from simulations.attacks.hostile import HostileServer
from simulations.attacks.settings import AttackSettings


@dataclass(frozen=True)
class Regions:
    """Market names, each one's node config, and the files behind them."""

    markets: list[str]
    node_configs: list[dict[str, Any]]
    catalog_path: Path

    def server(self, run_config: dict[str, Any], **policy: Any) -> HostileServer:
        """A hostile server over these regions; ``policy`` adds node config keys to every region."""
        return HostileServer(run_config, [{**config, **policy} for config in self.node_configs])


def regions(settings: AttackSettings, name: str, users: int = 300) -> Regions:
    """The federation of ``settings`` as deployed regions under ``settings.out/name``.

    Without a data directory, ``settings.synthetic_markets`` markets are generated, the largest
    with ``users`` users. Each region's state directory starts empty: a region that never spent.
    """
    root = Path(settings.out) / name
    root.mkdir(parents=True, exist_ok=True)
    if settings.data_dir:
        files = discover_market_files(settings.data_dir)
        source = MarketSource(settings.data_dir, 0, settings.seed)
    else:
        shape = SyntheticConfig(
            markets=settings.synthetic_markets,
            items=600,
            largest_market_users=users,
            smallest_market_users=max(40, users // 4),
            seed=settings.seed,
        )
        files = write_markets(shape, root / "data")
        source = MarketSource(str(root / "data"), 0, settings.seed)
    catalog_path = root / "catalog.txt"
    source.catalog().save(catalog_path)
    markets = sorted(files)
    configs = []
    for market in markets:
        state = root / "state" / market
        state.mkdir(parents=True, exist_ok=True)
        for stale in state.iterdir():  # a region that never spent: nothing from an earlier attack run
            stale.unlink()
        configs.append(
            {
                "market": market,
                "data-path": str(Path(files[market]).resolve()),
                "catalog-path": str(catalog_path.resolve()),
                "state-dir": str(state.resolve()),
            }
        )
    return Regions(markets, configs, catalog_path)


def fedals_run_config(settings: AttackSettings, **overrides: Any) -> dict[str, Any]:
    """The app's defaults for fedals, as a submitter would send them, with ``overrides``."""
    # Without a refit for serving: the attacks keep each exchange by its round's number, and a refit's rounds
    # (numbered from 1 again) are the same statistics over every interaction, under the same rules.
    return {**harness.app_defaults(), "method": "fedals", "seed": settings.seed, "serve-refit": False, **overrides}
