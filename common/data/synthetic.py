"""Synthetic multi-market interaction data in which small markets gain from big ones.

Products share latent factors across markets (a camera is a camera
everywhere), while each market shifts taste (where its users sit in factor
space) and popularity, and sells an overlapping subset of the catalog. Market
sizes follow a power law: a few large markets and many small ones. A small
market alone sees too few interactions to learn item factors; the federation
learns them from everyone, which is what the project exists to exploit.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of a generated federation."""

    markets: int = 6  # number of markets
    items: int = 1200  # products in the global catalog
    factors: int = 8  # true latent dimension shared by all markets
    largest_market_users: int = 1200  # users of the biggest market
    smallest_market_users: int = 40  # floor for the long tail of small markets
    size_decay: float = 1.2  # power-law exponent of market sizes by rank
    mean_interactions: int = 10  # per user; at least 5, as in the 5-core XMarket files
    taste_shift: float = 0.6  # spread of market centres in factor space
    popularity_shift: float = 0.7  # spread of market-specific item popularity
    catalog_share: float = 0.6  # chance a non-core product is sold in a market
    sharpness: float = 2.5  # how strongly tastes, not chance, drive choices
    # 0: each user weighs every product the market sells (exact, but users x items
    # logits); > 0: each user weighs this many products drawn by popularity, so that
    # catalogs of a million products generate in seconds (scale benchmarks).
    candidates: int = 0
    seed: int = 0  # everything below is a deterministic function of this
    # Dense rule only: draw this many users' choices at a time (0: all at once). The draws
    # are the same either way; blocks keep memory at block x items instead of users x items,
    # which 100k-user markets need.
    user_block: int = 0

    def __post_init__(self) -> None:
        if self.markets < 1:
            raise ValueError(f"A federation needs at least one market, got {self.markets}.")
        if self.items < 300:
            raise ValueError(
                f"Markets need enough items for 99 evaluation negatives; use at least "
                f"300 catalog items, got {self.items}."
            )
        if self.smallest_market_users < 5 or self.largest_market_users < self.smallest_market_users:
            raise ValueError(
                "Market sizes need 5 <= smallest_market_users <= largest_market_users, got "
                f"{self.smallest_market_users} and {self.largest_market_users}."
            )
        if self.mean_interactions < 5:
            raise ValueError(f"Users need at least 5 interactions, got {self.mean_interactions}.")
        if self.user_block < 0:
            raise ValueError(f"user_block is a number of users, or 0 for all at once, got {self.user_block}.")
        if self.candidates and self.candidates < 4 * self.mean_interactions:
            raise ValueError(
                f"Each user needs several candidates per interaction; use 0 (every product) or at "
                f"least {4 * self.mean_interactions} candidates, got {self.candidates}."
            )


def market_names(count: int) -> list[str]:
    """Names ``m00``, ``m01``, ... sorted like the partitions they become."""
    width = max(2, len(str(count - 1)))
    return [f"m{index:0{width}d}" for index in range(count)]


def generate_markets(config: SyntheticConfig) -> dict[str, pd.DataFrame]:
    """Interaction tables per market, columns ``userId itemId rating date``."""
    return dict(iter_markets(config))


def iter_markets(config: SyntheticConfig) -> Iterator[tuple[str, pd.DataFrame]]:
    """:func:`generate_markets` one market at a time: only one market's table is held at once."""
    rng = np.random.default_rng(config.seed)
    item_factors = rng.normal(0.0, 1.0 / np.sqrt(config.factors), (config.items, config.factors))
    base_popularity = rng.normal(0.0, 1.0, config.items)
    # Popular products are sold nearly everywhere; the tail varies by market.
    core = base_popularity > np.quantile(base_popularity, 0.6)
    item_ids = item_names(config.items)

    for rank, market in enumerate(market_names(config.markets)):
        users = max(
            config.smallest_market_users,
            round(config.largest_market_users * (rank + 1) ** -config.size_decay),
        )
        sold = core | (rng.random(config.items) < config.catalog_share)
        items = np.flatnonzero(sold)
        centre = rng.normal(0.0, config.taste_shift, config.factors)
        user_factors = centre + rng.normal(0.0, 1.0, (users, config.factors))
        popularity = base_popularity[items] + rng.normal(0.0, config.popularity_shift, len(items))
        counts = 5 + rng.poisson(config.mean_interactions - 5, users)
        if config.candidates:
            chosen = _choose_among_candidates(rng, config, user_factors, item_factors[items], popularity, counts.max())
        else:
            block = config.user_block or users
            chosen = np.empty((users, counts.max()), dtype=np.int64)
            for start in range(0, users, block):  # one block of users at a time draws the same numbers
                logits = config.sharpness * user_factors[start : start + block] @ item_factors[items].T + popularity
                # Gumbel top-k draws each user's distinct items in proportion to softmax(logits).
                perturbed = logits + rng.gumbel(size=logits.shape)
                chosen[start : start + block] = np.argsort(-perturbed, axis=1)[:, : counts.max()]
        frame = _interaction_frame(rng, market, chosen, counts, item_ids[items])
        frame["rating"] = rng.choice([3.0, 4.0, 5.0], size=len(frame), p=[0.2, 0.3, 0.5])
        frame["date"] = pd.Timestamp("2020-01-01") + pd.to_timedelta(frame["step"], unit="D")
        yield market, frame[["userId", "itemId", "rating", "date"]]


def _interaction_frame(
    rng: np.random.Generator, market: str, chosen: np.ndarray, counts: np.ndarray, item_ids: np.ndarray
) -> pd.DataFrame:
    """Columns ``userId itemId step``: each user's first ``counts[u]`` choices in a random order.

    One ``permutation`` per user, in user order, as the generator always drew them; the rows
    are assembled as arrays, so that a market of a million users builds in seconds.
    """
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    order = np.empty(int(starts[-1]), dtype=np.int64)
    for user, count in enumerate(counts.tolist()):
        order[starts[user] : starts[user + 1]] = rng.permutation(chosen[user, :count])
    users = np.repeat(np.arange(len(counts)), counts)
    names = np.array([f"{market}-u{user:05d}" for user in range(len(counts))], dtype=object)
    return pd.DataFrame(
        {
            "userId": names[users],
            "itemId": item_ids[order].astype(object),
            "step": np.arange(len(order)) - starts[users],
        }
    )


def item_names(count: int) -> np.ndarray:
    """The generated catalog's item IDs ``P00000``, ``P00001``, ... in row order."""
    return np.array([f"P{index:05d}" for index in range(count)])


def _choose_among_candidates(
    rng: np.random.Generator,
    config: SyntheticConfig,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    popularity: np.ndarray,
    most: int,
    chunk: int = 2048,
) -> np.ndarray:
    """Per user, ``most`` distinct positions in ``item_factors``: taste decides among popular candidates.

    Each user draws ``config.candidates`` products in proportion to ``exp(popularity)`` (with
    repetition; a repeat never wins twice) and takes the Gumbel top-``most`` of
    ``sharpness·taste + popularity`` among them: the dense rule's choice, restricted to the
    products a user ever looks at.
    """
    weights = np.exp(popularity - popularity.max())
    pool = _popularity_pool(rng, weights / weights.sum(), (len(user_factors), config.candidates), chunk)
    chosen = np.empty((len(user_factors), most), dtype=np.int64)
    for start in range(0, len(user_factors), chunk):
        block = pool[start : start + chunk]
        logits = config.sharpness * np.einsum("uf,ucf->uc", user_factors[start : start + chunk], item_factors[block])
        perturbed = logits + popularity[block] + rng.gumbel(size=block.shape)
        order = np.argsort(block, axis=1, kind="stable")
        ordered = np.take_along_axis(block, order, axis=1)
        repeat = np.zeros(block.shape, dtype=bool)
        repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        np.put_along_axis(
            perturbed, order, np.where(repeat, -np.inf, np.take_along_axis(perturbed, order, axis=1)), axis=1
        )
        best = np.argsort(-perturbed, axis=1)[:, :most]
        chosen[start : start + chunk] = np.take_along_axis(block, best, axis=1)
    return chosen


def _popularity_pool(rng: np.random.Generator, p: np.ndarray, shape: tuple[int, int], chunk: int) -> np.ndarray:
    """``rng.choice(len(p), size=shape, p=p)``, the same draws, built in chunks of rows as int32.

    ``Generator.choice`` with ``p`` inverts the CDF at ``shape`` uniforms drawn at once; drawing
    them chunk after chunk is the same stream, and a million users' pool then takes 2 GB
    instead of 8 (the uniforms and the int64 result at once).
    """
    cdf = p.cumsum()
    cdf /= cdf[-1]
    pool = np.empty(shape, dtype=np.int32 if len(p) < 2**31 else np.int64)
    for start in range(0, shape[0], chunk):
        rows = min(chunk, shape[0] - start)
        pool[start : start + rows] = cdf.searchsorted(rng.random((rows, shape[1])), side="right")
    return pool


def write_markets(
    config: SyntheticConfig, directory: str | Path, progress: Callable[[str, int], None] | None = None
) -> dict[str, Path]:
    """Generate the markets and write one CSV per market into ``directory``, one market at a time.

    ``progress(market, interactions)`` is called after each market is written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for market, frame in iter_markets(config):
        path = directory / f"{market}.csv"
        frame.to_csv(path, index=False, date_format="%Y-%m-%d")
        paths[market] = path
        if progress is not None:
            progress(market, len(frame))
    return paths
