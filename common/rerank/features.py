"""What a market knows of its items and users at one moment, and the features of its candidate lists.

``rerank`` re-orders fedals' candidate lists in each market with a learned ranker
(:mod:`common.rerank.ranker`). Every feature is computed by the market from what it holds anyway,
so nothing new leaves it:

* fedals' score of the candidate, its rank in the list (tied candidates share one) and its gap to
  the list's best score;
* the item's popularity in the market (its interactions) and in the federation as fedals shares
  it: whether the published item table has a factor for it and that factor's norm;
* co-occurrence with the user's own items within the market: over the users of the market, how
  many bought both the candidate and an item of the user's (summed and maximised over the user's
  items, with the user's latest item alone, and the sum relative to the candidate's popularity);
* the user's number of items;
* recency, where the data has dates: days from the item's latest and earliest sale in the market
  to the user's latest interaction.

A :class:`MarketContext` is what is known at one moment. Validation lists are described with the
training interactions alone; test lists with the training plus the validation interactions (as
fedals' folded-in users are); no context ever holds a test item, and a user's held-out item is
never among their own items, so no list sees its own answer.

The co-occurrence counts are a sorted table of ``(item a, item b)`` keys with their counts, read
with :func:`numpy.searchsorted`: a block of users' history-by-candidate lookups is one vectorised
call, without a sparse-matrix library and without a dense items-by-items matrix.
"""

from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.data.split import MarketSplit

FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "retrieval": ("fedals-score", "fedals-rank", "fedals-gap"),
    "popularity": ("market-count", "federation-norm", "federation-has-factor"),
    "cooccurrence": ("co-sum", "co-max", "co-last", "co-share"),
    "user": ("history-length",),
    "recency": ("days-since-last-sale", "days-since-first-sale"),
}
FEATURE_NAMES: tuple[str, ...] = tuple(name for names in FEATURE_GROUPS.values() for name in names)
# (history entry, candidate) co-occurrence keys looked up at once: 32 MiB of keys, whatever one user's
# history or list length
LOOKUP_CELLS = 1 << 22
SECONDS_PER_DAY = 86_400.0
RANK_BLOCK = 1_000  # lists whose ranks are computed at once (sorted as one block)


@dataclass(frozen=True)
class MarketContext:
    """A market's interactions known at one moment, grouped by user, each user's oldest first."""

    num_users: int
    users: np.ndarray  # (n,) local user index, non-decreasing
    items: np.ndarray  # (n,) catalog row
    days: np.ndarray  # (n,) float64 days since 1970-01-01, NaN where the data has no date


def interaction_days(
    split: MarketSplit, interactions: pd.DataFrame, catalog: Catalog, with_test: bool = False
) -> tuple[np.ndarray, ...]:
    """The day of each training and each validation interaction of ``split`` (NaN without a date).

    With ``with_test``, the day of each test interaction too (a third array): serving
    (:func:`serving_context`) knows every interaction of the market.

    Parameters
    ----------
    split : MarketSplit
        The market's split, with its user IDs.
    interactions : pandas.DataFrame
        The table the split was made from (columns ``user``, ``item``, ``date``, ``position``).
    catalog : Catalog
        The catalog the split maps items through.
    with_test : bool
        Return the test interactions' days as well.

    Raises
    ------
    ValueError
        If the split carries no user IDs or an interaction of it is not in the table.
    """
    if len(split.user_ids) != split.num_users:
        raise ValueError(f"Market '{split.market}': the split carries no user IDs to find its interactions' dates.")
    dates = pd.to_datetime(interactions["date"], utc=True)
    days = ((dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds() / SECONDS_PER_DAY).to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    # The interaction the split kept of a repeated (user, item): its latest, as split_market orders them.
    table = (
        pd.DataFrame(
            {
                "user": interactions["user"].astype(str).to_numpy(),
                "row": catalog.rows(interactions["item"]),
                "date": dates.to_numpy(),
                "position": interactions["position"].to_numpy(),
                "day": days,
            }
        )
        .sort_values(["date", "position"], kind="stable", na_position="first")
        .drop_duplicates(["user", "row"], keep="last")
    )
    ids = np.asarray(split.user_ids, dtype=object)

    def lookup(users: np.ndarray, rows: np.ndarray) -> np.ndarray:
        keys = pd.DataFrame({"user": ids[users], "row": rows})
        found = keys.merge(table[["user", "row", "day"]], on=["user", "row"], how="left", indicator=True)
        if (found["_merge"] != "both").any():
            raise ValueError(f"Market '{split.market}': some interactions of the split are not in its table.")
        return found["day"].to_numpy(dtype=np.float64)

    days = (lookup(split.train_users, split.train_items), lookup(split.valid.users, split.valid.candidates[:, 0]))
    if with_test:
        return (*days, lookup(split.test.users, split.test.candidates[:, 0]))
    return days


def market_contexts(
    split: MarketSplit, train_days: np.ndarray, valid_days: np.ndarray
) -> tuple[MarketContext, MarketContext]:
    """What the market knows when it ranks validation lists (training) and test lists (plus validation).

    Parameters
    ----------
    split : MarketSplit
        The market's split (training interactions grouped by user, oldest first).
    train_days, valid_days : np.ndarray
        :func:`interaction_days`: the day of each training and each validation interaction.
    """
    if len(train_days) != split.num_train or len(valid_days) != len(split.valid.users):
        raise ValueError(
            f"Market '{split.market}' has {split.num_train} training and {len(split.valid.users)} validation "
            f"interactions, but {len(train_days)} and {len(valid_days)} days were given."
        )
    train = MarketContext(split.num_users, split.train_users, split.train_items, np.asarray(train_days, np.float64))
    users = np.concatenate([split.train_users, split.valid.users])
    # A stable sort by user puts each user's validation interaction after their training ones.
    order = np.argsort(users, kind="stable")
    items = np.concatenate([split.train_items, split.valid.candidates[:, 0]])
    days = np.concatenate([train.days, np.asarray(valid_days, np.float64)])
    return train, MarketContext(split.num_users, users[order], items[order], days[order])


def serving_context(
    split: MarketSplit, train_days: np.ndarray, valid_days: np.ndarray, test_days: np.ndarray
) -> MarketContext:
    """What the market knows when it serves, after its evaluation: training, validation and test interactions.

    Parameters
    ----------
    split : MarketSplit
        The market's split (training interactions grouped by user, oldest first).
    train_days, valid_days, test_days : np.ndarray
        ``interaction_days(..., with_test=True)``: the day of each interaction of each stage.
    """
    if len(test_days) != len(split.test.users):
        raise ValueError(
            f"Market '{split.market}' has {len(split.test.users)} test interactions, but {len(test_days)} days "
            "were given."
        )
    _, known = market_contexts(split, train_days, valid_days)
    users = np.concatenate([known.users, split.test.users])
    # A stable sort by user puts each user's test interaction after everything else of theirs.
    order = np.argsort(users, kind="stable")
    items = np.concatenate([known.items, split.test.candidates[:, 0]])
    days = np.concatenate([known.days, np.asarray(test_days, np.float64)])
    return MarketContext(split.num_users, users[order], items[order], days[order])


@dataclass(frozen=True)
class FeatureTables:
    """A market's per-item and per-user tables at one moment: everything its list features read."""

    items: np.ndarray  # (m,) sorted catalog rows described: the market's assortment (the tables' columns)
    counts: np.ndarray  # (m,) interactions with each item
    last_day: np.ndarray  # (m,) latest day the item was bought, NaN if never or undated
    first_day: np.ndarray  # (m,) earliest day the item was bought, NaN if never or undated
    federation_norm: np.ndarray  # (m,) norm of the item's factor in fedals' published table, 0 without one
    pair_keys: np.ndarray  # sorted a * m + b over columns a != b that one user bought both of
    pair_counts: np.ndarray  # users who bought both, per key
    user_offsets: np.ndarray  # (users + 1,) each user's items in user_columns
    user_columns: np.ndarray  # columns of each user's items, oldest first
    user_day: np.ndarray  # (users,) the user's latest day, NaN if none

    @classmethod
    def build(cls, context: MarketContext, items: np.ndarray, federation_norm: np.ndarray) -> "FeatureTables":
        """The tables of ``context`` over the market's assortment ``items``.

        Parameters
        ----------
        context : MarketContext
            The interactions known (:func:`market_contexts`).
        items : np.ndarray
            Sorted catalog rows of the market's assortment; every item of ``context`` among them.
        federation_norm : np.ndarray
            ``(len(items),)`` norm of each item's published factor (0 where it has none).
        """
        items = np.asarray(items, dtype=np.int64)
        if len(items) == 0 or np.any(np.diff(items) <= 0):
            raise ValueError("The market's assortment must be a non-empty sorted list of distinct catalog rows.")
        if len(federation_norm) != len(items):
            raise ValueError(f"{len(federation_norm)} federation norms were given for {len(items)} items.")
        if len(context.users) and np.any(np.diff(context.users) < 0):
            raise ValueError("A market context must hold its interactions grouped by user.")
        columns = _columns(items, context.items)
        size = len(items)
        counts = np.bincount(columns, minlength=size).astype(np.float64)
        by_item = pd.Series(context.days).groupby(columns)
        last_day = np.full(size, np.nan)
        first_day = np.full(size, np.nan)
        last = by_item.max()
        first = by_item.min()
        last_day[last.index.to_numpy()] = last.to_numpy()
        first_day[first.index.to_numpy()] = first.to_numpy()
        per_user = np.bincount(context.users, minlength=context.num_users)
        offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
        user_day = np.full(context.num_users, np.nan)
        latest = pd.Series(context.days).groupby(context.users).max()
        user_day[latest.index.to_numpy()] = latest.to_numpy()
        # Every ordered pair of one user's items: entry i pairs with each entry of its user.
        repeats = per_user[context.users]
        left = np.repeat(np.arange(len(columns)), repeats)
        within = np.arange(len(left)) - np.repeat(np.cumsum(repeats) - repeats, repeats)
        right = offsets[context.users[left]] + within
        distinct = left != right
        keys = columns[left[distinct]] * size + columns[right[distinct]]
        pair_keys, pair_counts = np.unique(keys, return_counts=True)
        return cls(
            items=items,
            counts=counts,
            last_day=last_day,
            first_day=first_day,
            federation_norm=np.asarray(federation_norm, dtype=np.float64),
            pair_keys=pair_keys.astype(np.int64),
            pair_counts=pair_counts.astype(np.float64),
            user_offsets=offsets,
            user_columns=columns,
            user_day=user_day,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The tables as named arrays (for ``numpy.savez``); :meth:`from_arrays` reads them back."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "FeatureTables":
        """The tables of :meth:`arrays`' output.

        Raises
        ------
        ValueError
            If a table is missing.
        """
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if name not in arrays]
        if missing:
            raise ValueError(f"The feature tables lack {missing}.")
        return cls(**{name: np.asarray(arrays[name]) for name in names})

    def check(self) -> None:
        """Refuse tables that do not fit together (a damaged or foreign file), before any lookup reads them.

        Raises
        ------
        ValueError
            Naming the first table that does not fit.
        """
        one_d = {field.name: np.ndim(getattr(self, field.name)) == 1 for field in fields(self)}
        if not all(one_d.values()):
            raise ValueError(f"the tables {[name for name, ok in one_d.items() if not ok]} are not 1-d")
        for name in ("items", "pair_keys", "user_offsets", "user_columns"):
            if getattr(self, name).dtype.kind not in "iu":
                raise ValueError(f"the table {name} is not of integers")
        for name in ("counts", "last_day", "first_day", "federation_norm", "pair_counts", "user_day"):
            if getattr(self, name).dtype.kind != "f":
                raise ValueError(f"the table {name} is not of floats")
        size = len(self.items)
        if size == 0 or np.any(np.diff(self.items) <= 0) or self.items[0] < 0:
            raise ValueError("the assortment is not a non-empty sorted list of distinct catalog rows")
        if any(len(getattr(self, name)) != size for name in ("counts", "last_day", "first_day", "federation_norm")):
            raise ValueError("the per-item tables are not one value per item of the assortment")
        keys = self.pair_keys
        if (
            len(keys) != len(self.pair_counts)
            or np.any(np.diff(keys) <= 0)
            or (len(keys) and (keys[0] < 0 or keys[-1] >= size * size))
        ):
            raise ValueError("the co-occurrence keys are not sorted, distinct and within the assortment")
        offsets = self.user_offsets
        if (
            len(offsets) != len(self.user_day) + 1
            or offsets[0] != 0
            or np.any(np.diff(offsets) < 0)
            or offsets[-1] != len(self.user_columns)
        ):
            raise ValueError("the users' offsets are not 0, then ascending to their items' count, one per user")
        if len(self.user_columns) and (self.user_columns.min() < 0 or self.user_columns.max() >= size):
            raise ValueError("the users' items are not columns of the assortment")

    def columns_of(self, rows: np.ndarray) -> np.ndarray:
        """Each catalog row's column among :attr:`items`, -1 for a row outside the market's assortment."""
        rows = np.asarray(rows, dtype=np.int64)
        columns = np.searchsorted(self.items, rows).clip(max=len(self.items) - 1)
        return np.where(self.items[columns] == rows, columns, -1).astype(np.int64)

    def with_users(self, offsets: np.ndarray, columns: np.ndarray, days: np.ndarray) -> "FeatureTables":
        """These item tables with other users: user ``u``'s items are ``columns[offsets[u]:offsets[u + 1]]``.

        Serving describes a batch of users, some with interactions given at query time, with the
        market's item tables unchanged (shared, not copied).

        Parameters
        ----------
        offsets : np.ndarray
            ``(users + 1,)`` 0, then ascending to ``len(columns)``.
        columns : np.ndarray
            Columns of :attr:`items` each user bought, oldest first.
        days : np.ndarray
            ``(users,)`` each user's latest day, NaN if unknown.
        """
        tables = replace(
            self,
            user_offsets=np.asarray(offsets, dtype=np.int64),
            user_columns=np.asarray(columns, dtype=np.int64),
            user_day=np.asarray(days, dtype=np.float64),
        )
        tables.check()
        return tables

    def list_features(self, users: np.ndarray, candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The features of each user's candidate list, ``(users, candidates, len(FEATURE_NAMES))`` float64.

        Parameters
        ----------
        users : np.ndarray
            ``(n,)`` local user indices.
        candidates : np.ndarray
            ``(n, c)`` catalog rows, every one in the market's assortment.
        scores : np.ndarray
            ``(n, c)`` fedals' scores of the candidates.

        Raises
        ------
        ValueError
            If the shapes disagree, a user is unknown or a candidate is outside the assortment.
        """
        users = np.asarray(users, dtype=np.int64)
        candidates = np.asarray(candidates, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        if candidates.ndim != 2 or scores.shape != candidates.shape or len(users) != len(candidates):
            raise ValueError(
                f"Features need (n,) users with (n, c) candidates and scores, got {users.shape}, "
                f"{candidates.shape} and {scores.shape}."
            )
        if len(users) and (users.min() < 0 or users.max() >= len(self.user_day)):
            raise ValueError(f"Users must lie in [0, {len(self.user_day)}).")
        columns = _columns(self.items, candidates)
        rank = _rank_above(scores)
        co_sum, co_max, co_last = self._cooccurrence(users, columns)
        lengths = (self.user_offsets[users + 1] - self.user_offsets[users]).astype(np.float64)
        counts = self.counts[columns]
        user_day = self.user_day[users][:, None]
        norm = self.federation_norm[columns]
        values = {
            "fedals-score": scores,
            "fedals-rank": rank.astype(np.float64),
            "fedals-gap": scores - scores.max(axis=1, keepdims=True),
            "market-count": np.log1p(counts),
            "federation-norm": norm,
            "federation-has-factor": (norm > 0).astype(np.float64),
            "co-sum": np.log1p(co_sum),
            "co-max": np.log1p(co_max),
            "co-last": np.log1p(co_last),
            "co-share": co_sum / (counts + 1.0),
            "history-length": np.broadcast_to(np.log1p(lengths)[:, None], columns.shape),
            "days-since-last-sale": user_day - self.last_day[columns],
            "days-since-first-sale": user_day - self.first_day[columns],
        }
        return np.stack([values[name] for name in FEATURE_NAMES], axis=-1)

    def _cooccurrence(self, users: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per (user, candidate): co-occurrence summed and maximised over the user's items, and with their latest.

        The lookups are (history entries x candidates) keys: candidates go in slices narrow enough
        that the longest history's keys fit :data:`LOOKUP_CELLS`, users in blocks whose entries
        fill it, so that one user with a long history or a long list of pairs is bounded too.
        """
        co_sum = np.zeros(columns.shape)
        co_max = np.zeros(columns.shape)
        co_last = np.zeros(columns.shape)
        lengths = self.user_offsets[users + 1] - self.user_offsets[users]
        width = max(1, LOOKUP_CELLS // max(1, int(lengths.max(initial=1))))
        for first in range(0, columns.shape[1], width):
            part = slice(first, first + width)
            co_sum[:, part], co_max[:, part], co_last[:, part] = self._cooccurrence_slice(users, columns[:, part])
        return co_sum, co_max, co_last

    def _cooccurrence_slice(self, users: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_cooccurrence` for a slice of the candidates, users in blocks of about LOOKUP_CELLS keys."""
        size = len(self.items)
        co_sum = np.zeros(columns.shape)
        co_max = np.zeros(columns.shape)
        co_last = np.zeros(columns.shape)
        starts, ends = self.user_offsets[users], self.user_offsets[users + 1]
        lengths = ends - starts
        entries = max(1, LOOKUP_CELLS // max(1, columns.shape[1]))
        block_start = 0
        while block_start < len(users):
            # Users whose history entries together stay near `entries` (at least one user).
            total = np.cumsum(lengths[block_start:])
            block_end = block_start + max(1, int(np.searchsorted(total, entries, side="right")))
            block = np.arange(block_start, block_end)
            has_items = block[lengths[block] > 0]
            if len(has_items):
                counts = lengths[has_items]
                owner = np.repeat(np.arange(len(has_items)), counts)
                entry = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
                history = self.user_columns[starts[has_items][owner] + entry]
                keys = history[:, None] * size + columns[has_items][owner]
                at = np.searchsorted(self.pair_keys, keys).clip(max=max(len(self.pair_keys) - 1, 0))
                found = self.pair_keys[at] == keys if len(self.pair_keys) else np.zeros(keys.shape, dtype=bool)
                values = np.where(found, self.pair_counts[at] if len(self.pair_keys) else 0.0, 0.0)
                first = np.concatenate([[0], np.cumsum(counts)[:-1]])
                co_sum[has_items] = np.add.reduceat(values, first, axis=0)
                co_max[has_items] = np.maximum.reduceat(values, first, axis=0)
                co_last[has_items] = values[first + counts - 1]
            block_start = block_end
        return co_sum, co_max, co_last


def _rank_above(scores: np.ndarray) -> np.ndarray:
    """Each candidate's rank in its list: how many candidates score strictly higher.

    Tied candidates share a rank. Breaking ties by position would leak the answer: the held-out
    item is always column 0, so it would win every tie (fedals scores every item without a
    published factor 0, a large tie in markets with many private items).

    Computed by sorting each list (``c log c`` per list, so a served list of a few thousand
    candidates costs little): in a list sorted ascending, the candidates strictly above one are
    those after the last of its ties. Scores are numbers or ``-inf`` (a NaN is not ordered).
    """
    scores = np.asarray(scores, dtype=np.float64)
    rank = np.empty(scores.shape, dtype=np.float64)
    width = scores.shape[1] if scores.ndim == 2 else 0
    if width == 0:
        return rank
    for start in range(0, len(scores), RANK_BLOCK):
        block = scores[start : start + RANK_BLOCK]
        order = np.argsort(block, axis=1, kind="stable")
        ascending = np.take_along_axis(block, order, axis=1)
        # The position of the last of each candidate's ties, from the right: a running minimum.
        ends_run = np.ones(ascending.shape, dtype=bool)
        ends_run[:, :-1] = ascending[:, 1:] != ascending[:, :-1]
        last = np.where(ends_run, np.arange(width), width)
        last = np.minimum.accumulate(last[:, ::-1], axis=1)[:, ::-1]
        above = (width - 1 - last).astype(np.float64)
        np.put_along_axis(rank[start : start + RANK_BLOCK], order, above, axis=1)
    return rank


def _columns(items: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The column of each catalog row of ``rows`` among the sorted ``items``; raises on a row not among them."""
    columns = np.searchsorted(items, rows).clip(max=len(items) - 1)
    if np.any(items[columns] != rows):
        raise ValueError("Some items are outside the market's assortment the feature tables describe.")
    return columns.astype(np.int64)
