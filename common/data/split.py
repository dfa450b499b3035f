"""Deterministic leave-one-out split and seeded 99-negative evaluation lists.

The XMarket protocol, made reproducible: per user, interactions sorted by date
with a stable sort (file order breaks ties); the last goes to test, the
second-last to validation, the rest to training. Each held-out item is ranked
against negatives drawn with a fixed seed from the market's items the user
never interacted with.
"""

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.data.catalog import Catalog

NUM_NEGATIVES = 99  # the published XMarket protocol ranks against 99 negatives


@dataclass(frozen=True)
class EvalSet:
    """Users to rank for, each with a candidate row: the held-out item first."""

    users: np.ndarray  # (n,) user index within the market
    candidates: np.ndarray  # (n, 1 + NUM_NEGATIVES) catalog rows, positive in column 0


@dataclass(frozen=True)
class MarketSplit:
    """One market's data after the split, in catalog rows and local user indices."""

    market: str
    num_users: int
    train_users: np.ndarray  # (m,) local user index per training interaction
    train_items: np.ndarray  # (m,) catalog row per training interaction
    market_items: np.ndarray  # sorted catalog rows the market has seen; negatives come from here
    valid: EvalSet
    test: EvalSet
    user_ids: Sequence[str] = ()  # the user ID of each local index; never leaves the market (the served model's map)

    @property
    def num_train(self) -> int:
        """Training interactions: the weight of this market in FedAvg."""
        return len(self.train_users)


def split_market(market: str, interactions: pd.DataFrame, catalog: Catalog, seed: int) -> MarketSplit:
    """Split one market's interactions and draw its evaluation negatives.

    Parameters
    ----------
    market : str
        Market name; it seeds the negatives so markets draw independently.
    interactions : pd.DataFrame
        Columns ``user``, ``item``, ``date`` and ``position`` as returned by
        :func:`common.data.read_interactions`.
    catalog : Catalog
        Maps item IDs to rows of the shared item table.
    seed : int
        Seed of the negative draws.

    Returns
    -------
    MarketSplit
        Users with fewer than three interactions train but are not evaluated.
    """
    if interactions.empty:
        raise ValueError(f"Market '{market}' has no interactions to split.")
    frame = interactions.assign(row=catalog.rows(interactions["item"]))
    frame = frame.sort_values(["date", "position"], kind="stable", na_position="first")
    # Sorting by user last with a stable sort keeps each user's date order.
    frame = frame.sort_values("user", kind="stable")
    # Two item IDs of one user that map to one row (unknown items hashed to one overflow row)
    # are one interaction, the latest kept as for repeated pairs: a user adds at most one
    # term to a row, which the DP release's per-user bound relies on.
    frame = frame.drop_duplicates(["user", "row"], keep="last")
    user_codes, user_ids = pd.factorize(frame["user"], sort=True)
    frame = frame.assign(uid=user_codes)
    counts = frame.groupby("uid", sort=True)["uid"].transform("size").to_numpy()
    from_end = frame.groupby("uid", sort=True).cumcount(ascending=False).to_numpy()
    evaluated = counts >= 3
    is_test = evaluated & (from_end == 0)
    is_valid = evaluated & (from_end == 1)
    is_train = ~(is_test | is_valid)

    uid = frame["uid"].to_numpy()
    rows = frame["row"].to_numpy()
    market_items = np.unique(rows)
    seen_by_user = pd.Series(rows).groupby(uid).agg(frozenset).to_dict()
    rng = np.random.default_rng([seed, zlib.crc32(market.encode("utf-8"))])
    valid = _eval_set(uid[is_valid], rows[is_valid], seen_by_user, market_items, rng)
    test = _eval_set(uid[is_test], rows[is_test], seen_by_user, market_items, rng)
    return MarketSplit(
        market=market,
        num_users=int(uid.max()) + 1,
        train_users=uid[is_train],
        train_items=rows[is_train],
        market_items=market_items,
        valid=valid,
        test=test,
        user_ids=tuple(str(user) for user in user_ids),
    )


def _eval_set(
    users: np.ndarray,
    positives: np.ndarray,
    seen_by_user: dict[int, frozenset],
    market_items: np.ndarray,
    rng: np.random.Generator,
) -> EvalSet:
    candidates = np.empty((len(users), 1 + NUM_NEGATIVES), dtype=np.int64)
    for n, (user, positive) in enumerate(zip(users, positives, strict=True)):
        candidates[n, 0] = positive
        candidates[n, 1:] = _draw_negatives(seen_by_user[user], market_items, rng)
    return EvalSet(users=users, candidates=candidates)


def _draw_negatives(seen: frozenset, market_items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    unseen = len(market_items) - len(seen)
    if unseen < NUM_NEGATIVES:
        raise ValueError(
            f"A user has seen all but {unseen} of the market's {len(market_items)} "
            f"items; evaluation needs {NUM_NEGATIVES} unseen items per user."
        )
    # Rejection sampling: users see few of a market's items, so a couple of
    # oversized draws almost always suffice and stay deterministic under the seed.
    chosen: list[int] = []
    taken: set[int] = set(seen)
    while len(chosen) < NUM_NEGATIVES:
        for item in rng.choice(market_items, size=2 * NUM_NEGATIVES):
            if item not in taken:
                taken.add(int(item))
                chosen.append(int(item))
                if len(chosen) == NUM_NEGATIVES:
                    break
    return np.asarray(chosen, dtype=np.int64)
