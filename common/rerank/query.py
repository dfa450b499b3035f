"""A loaded rerank model answering as a served model does: top-K recommendations and pair scores.

``xmfl recommend`` and ``xmfl score`` ask a :class:`RerankServer` what they ask a
:class:`common.serving.query.ServedModel`, with the same columns:

* **recommend**: the retriever (fedals' served model) gives each user its top ``retrieve``
  candidates of the market's assortment, what the user bought excluded as the served model
  excludes it; each candidate is described by :mod:`common.rerank.features` from the market's
  tables as of serving (every interaction, test included) and the user's own interactions
  (stored, then those given at query time); the market's LightGBM ranker orders them and the top
  ``k`` are returned with the ranker's score. A market that kept fedals' order (no ranker) returns
  the retriever's top ``k`` with its scores.
* **score**: the given pairs of one user are one list: scored by the retriever, described and
  ranked together. The features of a candidate depend on the others of its list (its rank and its
  gap to the best), so a rerank score is comparable only among one user's pairs scored together.

Lists of different lengths are ranked in blocks of about :data:`LIST_CELLS` candidates, users of
similar lengths together, so that memory is bounded whatever the number of pairs a user has.
"""

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from common.rerank.features import FeatureTables
from common.rerank.served import RerankModel
from common.serving.batching import RecentHistory, ranges, users_per_batch
from common.serving.query import joined_batches

DEFAULT_RETRIEVE = 200  # candidates a user's list holds before the ranker orders it
LIST_CELLS = 1 << 18  # candidates described at once: about 27 MiB of features


class RerankServer:
    """A market's rerank model ready to answer, with :class:`ServedModel`'s interface.

    Parameters
    ----------
    model : RerankModel
        The loaded rerank directory (:func:`common.rerank.served.load_rerank_model`).
    """

    def __init__(self, model: RerankModel) -> None:
        self.model = model
        self.retriever = model.retriever
        self.tables = model.serving_tables
        self._items = pd.Index(self.retriever.catalog.item_ids)

    @property
    def market(self) -> str:
        """The market this model serves."""
        return self.model.market

    @property
    def user_ids(self) -> list[str]:
        """The market's users the model knows."""
        return self.retriever.user_ids

    @property
    def assortment(self) -> list[str]:
        """The items the retriever can recommend."""
        return self.retriever.assortment

    def recent_history(self, extra_history: "pd.DataFrame | RecentHistory | None") -> RecentHistory | None:
        """As :meth:`ServedModel.recent_history`."""
        return self.retriever.recent_history(extra_history)

    def user_index(self, user_ids: Iterable[str]) -> np.ndarray:
        """As :meth:`ServedModel.user_index`."""
        return self.retriever.user_index(user_ids)

    def known_items(self, item_ids: Iterable[str]) -> np.ndarray:
        """As :meth:`ServedModel.known_items`."""
        return self.retriever.known_items(item_ids)

    def recommend(
        self,
        user_ids: Iterable[str],
        k: int,
        extra_history: "pd.DataFrame | RecentHistory | None" = None,
        batch_users: int | None = None,
        retrieve: int = DEFAULT_RETRIEVE,
    ) -> pd.DataFrame:
        """All of :meth:`recommend_batches`' rows in one frame (``attrs["unknown_users"]`` summed)."""
        return joined_batches(list(self.recommend_batches(user_ids, k, extra_history, batch_users, retrieve)))

    def recommend_batches(
        self,
        user_ids: Iterable[str],
        k: int,
        extra_history: "pd.DataFrame | RecentHistory | None" = None,
        batch_users: int | None = None,
        retrieve: int = DEFAULT_RETRIEVE,
    ) -> Iterator[pd.DataFrame]:
        """Each user's top ``k`` of the retriever's top ``retrieve``, as the ranker orders them, a batch at a time.

        Parameters
        ----------
        user_ids : Iterable[str]
            Users to recommend to, answered once each in first-seen order.
        k : int
            Recommendations per user.
        extra_history : pandas.DataFrame or RecentHistory, optional
            Interactions given at query time, as for :meth:`ServedModel.recommend`: they shape the
            retriever's user vector, are excluded, and count among the user's items in the
            features (their dates are not read: a user's recency is their stored latest day).
        batch_users : int, optional
            Users retrieved and ranked at once (default: :func:`users_per_batch` of the assortment).
        retrieve : int
            Candidates retrieved per user, at least ``k``.

        Returns
        -------
        Iterator[pandas.DataFrame]
            Frames with columns ``userId``, ``rank`` (1 is best), ``itemId``, ``score`` (the
            ranker's; the retriever's where the market kept fedals' order), ``attrs`` as
            :meth:`ServedModel.recommend_batches`'.

        Raises
        ------
        ValueError
            If ``k``, ``retrieve`` or ``batch_users`` is below 1, or ``retrieve`` below ``k``.
        """
        if k < 1 or retrieve < k:
            raise ValueError(f"Reranked recommendations need k >= 1 and retrieve >= k, got k={k}, retrieve={retrieve}.")
        size = users_per_batch(len(self.assortment)) if batch_users is None else batch_users
        if size < 1:
            raise ValueError(f"Batches need at least 1 user, got {size}.")
        users = list(dict.fromkeys(str(user) for user in user_ids))
        return self._recommend_batches(users, k, self.recent_history(extra_history), size, retrieve)

    def _recommend_batches(
        self, users: list[str], k: int, extra: RecentHistory | None, size: int, retrieve: int
    ) -> Iterator[pd.DataFrame]:
        for start in range(0, len(users), size):
            batch = users[start : start + size]
            for retrieved in self.retriever.recommend_batches(batch, retrieve, extra, size):
                frame = self._rerank_batch(batch, retrieved, k, extra)
                frame.attrs = dict(retrieved.attrs)
                yield frame

    def _rerank_batch(
        self, users: list[str], retrieved: pd.DataFrame, k: int, extra: RecentHistory | None
    ) -> pd.DataFrame:
        """The top ``k`` of each user's retrieved candidates (``retrieved``: the retriever's rows, by user and rank)."""
        owner = pd.Index(users, dtype=object).get_indexer(retrieved["userId"].to_numpy(dtype=object))
        rows = self._items.get_indexer(retrieved["itemId"].to_numpy(dtype=object))
        scores = self.rank_pairs(users, owner, rows, retrieved["score"].to_numpy(dtype=np.float64), extra)
        # By user in the batch's order, best first; ties keep the retriever's order (a stable sort).
        order = np.lexsort((-scores, owner))
        owner, scores = owner[order], scores[order]
        counts = np.bincount(owner, minlength=len(users))
        rank = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts) + 1
        keep = rank <= k
        return pd.DataFrame(
            {
                "userId": retrieved["userId"].to_numpy(dtype=object)[order][keep],
                "rank": rank[keep],
                "itemId": retrieved["itemId"].to_numpy(dtype=object)[order][keep],
                "score": scores[keep],
            }
        )

    def score(self, pairs: pd.DataFrame, extra_history: "pd.DataFrame | RecentHistory | None" = None) -> pd.DataFrame:
        """The ranker's scores of ``(userId, itemId)`` pairs, each user's pairs ranked as one list.

        Parameters
        ----------
        pairs : pandas.DataFrame
            Columns ``userId`` and ``itemId``.
        extra_history : pandas.DataFrame or RecentHistory, optional
            As for :meth:`recommend_batches`.

        Returns
        -------
        pandas.DataFrame
            Columns ``userId``, ``itemId``, ``score`` in the order of ``pairs``, as
            :meth:`ServedModel.score` returns them. A score is comparable only with the other
            scores of the same user in the same call: the features of a candidate depend on the
            others of its list. An item the catalog does not list, or the market does not sell
            (its features are the market's), scores NaN and is not part of its user's list.
        """
        extra = self.recent_history(extra_history)
        scored = self.retriever.score(pairs, extra_history=extra)
        codes, users = pd.factorize(scored["userId"])
        rows = self._items.get_indexer(scored["itemId"].to_numpy(dtype=object))
        retrieval = scored["score"].to_numpy(dtype=np.float64)
        listed = (rows >= 0) & (self.tables.columns_of(np.maximum(rows, 0)) >= 0) & np.isfinite(retrieval)
        result = np.full(len(scored), np.nan)
        result[listed] = self.rank_pairs(list(users), codes[listed], rows[listed], retrieval[listed], extra)
        out = scored.assign(score=result)
        out.attrs = dict(scored.attrs)
        return out

    def rank_pairs(
        self,
        users: Sequence[str],
        owner: np.ndarray,
        rows: np.ndarray,
        retrieval: np.ndarray,
        extra: RecentHistory | None,
    ) -> np.ndarray:
        """Ranker scores of pairs: pair ``i`` is user ``users[owner[i]]`` with catalog row ``rows[i]``,
        scored ``retrieval[i]`` by the retriever; each user's pairs are one list.

        Every row must be in the market's assortment and every retrieval score finite.
        """
        owner = np.asarray(owner, dtype=np.int64)
        result = np.full(len(owner), np.nan)
        if len(owner) == 0:
            return result
        tables = self.user_tables(users, extra)
        counts = np.bincount(owner, minlength=len(users))
        order = np.argsort(owner, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        listed = np.flatnonzero(counts)
        listed = listed[np.argsort(counts[listed], kind="stable")]  # shortest lists first
        done = 0
        while done < len(listed):
            # As many users as fit in LIST_CELLS at the width of the longest of them (at least one).
            # Lists are sorted by length, so the users that fit are a prefix of the window.
            window = counts[listed[done : done + LIST_CELLS]]
            fitting = int((np.arange(1, len(window) + 1) * window <= LIST_CELLS).sum())
            block = listed[done : done + max(1, fitting)]
            done += len(block)
            width = int(counts[block].max())
            positions, flat = ranges(starts[block], starts[block + 1])
            within = flat - starts[block][positions]
            pairs = order[flat]
            candidates = np.full((len(block), width), tables.items[0], dtype=np.int64)
            scores = np.full((len(block), width), -np.inf)  # padding: below every candidate, dropped
            candidates[positions, within] = rows[pairs]
            scores[positions, within] = retrieval[pairs]
            features = tables.list_features(block, candidates, scores)
            ranked = self.model.fit.scores(features, 1, self.model.booster)
            result[pairs] = ranked[positions, within]
        return result

    def user_tables(self, users: Sequence[str], extra: RecentHistory | None) -> FeatureTables:
        """The serving tables with ``users`` as their users: stored items, then ``extra``'s, each once at its latest.

        Items outside the market's assortment are left out (no co-occurrence of the market's
        counts them); a user the market does not know has no stored items and no latest day.
        """
        indices = self.user_index(users)
        known = indices >= 0
        safe = np.maximum(indices, 0)
        offsets = self.tables.user_offsets
        positions, flat = ranges(np.where(known, offsets[safe], 0), np.where(known, offsets[safe + 1], 0))
        columns = self.tables.user_columns[flat]
        days = np.where(known, self.tables.user_day[safe], np.nan)
        if extra is not None:
            where = extra.users.get_indexer(pd.Index(list(users), dtype=object))
            found = where >= 0
            at = np.maximum(where, 0)
            added_positions, added = ranges(
                np.where(found, extra.offsets[at], 0), np.where(found, extra.offsets[at + 1], 0)
            )
            added_columns = self.tables.columns_of(extra.rows[added])
            sold = added_columns >= 0
            positions = np.concatenate([positions, added_positions[sold]])
            columns = np.concatenate([columns, added_columns[sold]])
            # Group by user, stored items first; an item seen again counts once, at its latest.
            order = np.lexsort((np.arange(len(positions)), positions))
            positions, columns = positions[order], columns[order]
            keys = positions * len(self.tables.items) + columns
            _, last_from_end = np.unique(keys[::-1], return_index=True)
            keep = np.sort(len(keys) - 1 - last_from_end)
            positions, columns = positions[keep], columns[keep]
        per_user = np.bincount(positions, minlength=len(users))
        return self.tables.with_users(np.concatenate([[0], np.cumsum(per_user)]), columns, days)
