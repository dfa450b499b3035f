"""Where a federation's markets come from: a directory of files or the generator.

Simulation maps partition ids to market names in sorted order and may build
the catalog from every market's items. Deployment gives each region its own
file and the company catalog by path; nothing here is assembled from what
regions send.
"""

import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pandas as pd

from common.data.catalog import Catalog
from common.data.interactions import discover_market_files, read_interactions
from common.data.split import MarketSplit, split_market
from common.data.split_store import split_key, split_store, stored_split
from common.data.synthetic import SyntheticConfig, generate_markets


@dataclass(frozen=True)
class MarketSource:
    """A directory with one file per market, or generated markets when ``data_dir`` is empty."""

    data_dir: str = ""  # one interaction file per market; empty means synthetic
    synthetic_markets: int = 6  # how many markets to generate when there is no directory
    seed: int = 0  # seeds the generator and the evaluation negatives

    @property
    def markets(self) -> list[str]:
        """Market names in partition order."""
        return list(_tables(self)) if not self.data_dir else list(_files(self.data_dir))

    def interactions(self, market: str) -> pd.DataFrame:
        """The market's interactions in the shape of :func:`common.data.read_interactions`."""
        if self.data_dir:
            files = _files(self.data_dir)
            if market not in files:
                raise KeyError(f"No market '{market}' in {self.data_dir}; it has {sorted(files)}.")
            return read_interactions(files[market])
        tables = _tables(self)
        if market not in tables:
            raise KeyError(f"No synthetic market '{market}'; there are {len(tables)}.")
        return tables[market]

    def catalog(self) -> Catalog:
        """Catalog of every market's items: for simulation, where one process may see them all."""
        return _catalog(self)


@cache
def _files(data_dir: str) -> dict[str, Path]:
    return discover_market_files(data_dir)


@cache
def _catalog(source: MarketSource) -> Catalog:
    # Cached per process: every ClientApp call in a simulation asks for it.
    return Catalog.from_items(item for market in source.markets for item in source.interactions(market)["item"])


@cache
def _tables(source: MarketSource) -> dict[str, pd.DataFrame]:
    generated = generate_markets(SyntheticConfig(markets=source.synthetic_markets, seed=source.seed))
    return {
        market: pd.DataFrame(
            {
                "user": frame["userId"],
                "item": frame["itemId"],
                "rating": frame["rating"].astype("float64"),
                "date": frame["date"],
                "position": range(len(frame)),
            }
        )
        for market, frame in generated.items()
    }


@cache
def load_split(source: MarketSource, market: str, catalog: Catalog) -> MarketSplit:
    """The market's split, cached per process: a client re-reads nothing between rounds.

    Where the environment names a split store (:func:`common.data.split_store.split_store`,
    set by the simulation harness), a market read from a file is split once for every
    process and memory-mapped from there.
    """
    directory = split_store()
    if directory is None or not source.data_dir:
        return split_market(market, source.interactions(market), catalog, source.seed)
    files = _files(source.data_dir)
    if market not in files:
        raise KeyError(f"No market '{market}' in {source.data_dir}; it has {sorted(files)}.")
    stat = files[market].stat()
    key = split_key(files[market].resolve(), stat.st_size, stat.st_mtime_ns, market, source.seed, catalog.fingerprint())
    return stored_split(directory, key, lambda: split_market(market, source.interactions(market), catalog, source.seed))


@cache
def load_file_split(path: str, market: str, catalog: Catalog, seed: int) -> MarketSplit:
    """Split of a single region's file, as a deployed client sees its data."""
    return split_market(market, read_interactions(path), catalog, seed)


def market_seed(market: str, seed: int) -> int:
    """A per-market seed that is the same in every process."""
    return (seed * 1_000_003 + zlib.crc32(market.encode("utf-8"))) % 2**31
