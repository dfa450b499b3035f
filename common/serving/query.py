"""A loaded served model: the query object ``xmfl recommend`` and ``xmfl score`` ask.

:func:`load_served_model` reads and checks a directory in the format of
:mod:`common.serving.format` (one :class:`ServedModelError` naming what does not match);
:class:`ServedModel` answers top-k recommendations and candidate scores for the market's users
or for histories given at query time, in batches of bounded memory: :meth:`ServedModel.recommend_batches`
yields one batch of users' recommendations at a time, whose scores take at most a memory budget
(:func:`users_per_batch`), so that a million-user market streams to a file.
"""

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.neural.model import SplitRecommender
from common.serving.batching import (
    ITEM_BATCH,
    PAIR_BATCH,
    USER_BATCH,
    Histories,
    RecentHistory,
    history_rows,
    ranges,
    top_k,
    users_per_batch,
)
from common.serving.checks import LOAD_ERRORS, MARKET_ENTRIES, check_market_data, model_config, read_mapped
from common.serving.format import (
    MARKET_FILE,
    MODEL_FILE,
    ServedModelError,
    read_manifest,
)
from common.serving.sparse_state import expand_state


class ServedModel:
    """A market's model ready to answer: top-K recommendations and scores of (user, item) pairs.

    Users are known by their market's user IDs and items by catalog item IDs.
    An unknown user gets the market's history-free ranking (the model with an
    empty history: the popularity bias and whatever the head does without a
    history), unless ``extra_history`` gives them interactions.
    """

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        model: SplitRecommender,
        catalog: Catalog,
        user_ids: list[str],
        history_offsets: torch.Tensor,
        history_items: torch.Tensor,
        test_held_out: torch.Tensor,
        assortment: list[str],
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.model = model.eval()
        self.catalog = catalog
        self.user_ids = list(user_ids)
        self._users = pd.Index(self.user_ids)
        self._items = pd.Index(catalog.item_ids)
        check_market_data(directory, user_ids, history_offsets, history_items, test_held_out, assortment)
        self._offsets = history_offsets.numpy().astype(np.int64)
        self._history = history_items.numpy().astype(np.int64)
        self._test_held_out = test_held_out.numpy().astype(np.int64)
        if (
            not self._users.is_unique
            or len(self._offsets) != len(self.user_ids) + 1
            or len(self.user_ids) != model.config.num_users
        ):
            raise ServedModelError(f"The served model {directory} has inconsistent user data.")
        if (
            self._offsets[-1] != len(self._history)
            or (self._history < 0).any()
            or (self._history >= catalog.size).any()
        ):
            raise ServedModelError(f"The served model {directory} has histories outside its catalog.")
        if model.config.num_items != catalog.size:
            raise ServedModelError(
                f"The served model {directory} has {model.config.num_items} item rows for a catalog of {catalog.size}."
            )
        self.assortment = list(assortment)
        rows = self._items.get_indexer(self.assortment)
        if (rows < 0).any():
            raise ServedModelError(f"The served model {directory} sells items its catalog does not list.")
        self._assortment_ids = np.asarray(self.assortment, dtype=object)
        self._column_of = np.full(catalog.size, -1, dtype=np.int64)
        self._column_of[rows] = np.arange(len(rows))
        self._assortment_rows = rows
        self._matrix: np.ndarray | None = None  # made by the first recommendation: score needs none

    @property
    def _assortment_matrix(self) -> np.ndarray:
        """``[item vector | bias]`` of each item sold: ``[user vector | 1]`` times it is the score, one product."""
        if self._matrix is None:
            dim = self.model.config.dim
            matrix = np.empty((len(self._assortment_rows), dim + 1), dtype=np.float32)
            for start in range(0, len(matrix), ITEM_BATCH):
                vectors, bias = self._item_vectors(self._assortment_rows[start : start + ITEM_BATCH])
                matrix[start : start + len(bias), :dim], matrix[start : start + len(bias), dim] = vectors, bias
            self._matrix = matrix
        return self._matrix

    @torch.no_grad()
    def _item_vectors(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded vectors and biases of catalog ``rows``, :data:`ITEM_BATCH` at a time (no full-size temporaries)."""
        vectors = torch.empty((len(rows), self.model.config.dim))
        bias = torch.empty(len(rows))
        for start in range(0, len(rows), ITEM_BATCH):
            chunk = torch.as_tensor(rows[start : start + ITEM_BATCH], dtype=torch.long)
            vectors[start : start + len(chunk)] = self.model.encoder(chunk)
            bias[start : start + len(chunk)] = self.model.head.item_bias(chunk)[:, 0]
        return vectors, bias

    @property
    def market(self) -> str:
        """The market this model serves."""
        return str(self.manifest["market"])

    @property
    def history_length(self) -> int:
        """Most recent interactions pooled into a user's vector."""
        return self.model.config.history_length

    def known_users(self, user_ids: Iterable[str]) -> np.ndarray:
        """Whether each of ``user_ids`` is a user of the market the model knows."""
        return self._users.get_indexer(pd.Index([str(user) for user in user_ids])) >= 0

    def known_items(self, item_ids: Iterable[str]) -> np.ndarray:
        """Whether each of ``item_ids`` is in the catalog (only those get a score)."""
        return self._items.get_indexer(pd.Index([str(item) for item in item_ids])) >= 0

    def user_index(self, user_ids: Iterable[str]) -> np.ndarray:
        """Each of ``user_ids``'s row among :attr:`user_ids`, -1 for a user the model does not know."""
        return self._users.get_indexer(pd.Index([str(user) for user in user_ids], dtype=object))

    @property
    def item_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """The assortment's item vectors ``(items, dim)`` and biases ``(items,)``, in :attr:`assortment` order.

        Views of what the model ranks with (not copies): a user's score of item ``i`` is their
        vector (:meth:`user_vectors`) times ``vectors[i]`` plus ``bias[i]``.
        """
        dim = self.model.config.dim
        return self._assortment_matrix[:, :dim], self._assortment_matrix[:, dim]

    @torch.no_grad()
    def user_vectors(
        self, user_ids: Sequence[str], extra_history: "pd.DataFrame | RecentHistory | None" = None
    ) -> np.ndarray:
        """The vectors ``(users, dim)`` the model ranks ``user_ids`` with, as :meth:`recommend` makes them."""
        users = [str(user) for user in user_ids]
        extra = self.recent_history(extra_history)
        indices = self.user_index(users)
        vectors = np.zeros((len(users), self.model.config.dim), dtype=np.float32)
        for start in range(0, len(users), USER_BATCH):
            batch = slice(start, start + USER_BATCH)
            histories = self._histories(users[batch], indices[batch], extra, as_of_test=False)
            vectors[batch] = self._user_vectors(indices[batch], histories).numpy()
        return vectors

    def recent_history(self, extra_history: "pd.DataFrame | RecentHistory | None") -> RecentHistory | None:
        """``extra_history`` (a table like a market file) grouped by user, for several queries.

        :meth:`recommend` and :meth:`score` take either; a command that asks in many
        batches groups it once. Columns ``userId``, ``itemId`` and optional ``date`` (the
        interactions are ordered by it, undated first, file order breaking ties); other
        columns are ignored. None or an empty table: None.
        """
        if extra_history is None or isinstance(extra_history, RecentHistory):
            return extra_history
        frame = history_rows(extra_history, self.catalog)
        if frame is None:
            return None
        codes, users = pd.factorize(frame["userId"])
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=len(users))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return RecentHistory(pd.Index(users, dtype=object), offsets, frame["row"].to_numpy()[order])

    def recommend(
        self,
        user_ids: Iterable[str],
        k: int,
        extra_history: "pd.DataFrame | RecentHistory | None" = None,
        batch_users: int | None = None,
    ) -> pd.DataFrame:
        """Top ``k`` of the market's assortment for each user, without what the user already bought.

        Parameters
        ----------
        user_ids : Iterable[str]
            Users to recommend to, answered once each in first-seen order.
        k : int
            Recommendations per user; fewer when the user bought nearly all the assortment.
        extra_history : pandas.DataFrame or RecentHistory, optional
            Recent interactions like a market file (``userId``, ``itemId``,
            optional ``date``; other columns ignored), after the known ones:
            they shape the user's vector and are excluded too.
        batch_users : int, optional
            Users ranked at once (default: :func:`users_per_batch` of the assortment).

        Returns
        -------
        pandas.DataFrame
            Columns ``userId``, ``rank`` (1 is best), ``itemId``, ``score``;
            ``attrs["unknown_users"]`` counts users the model did not know.
            All users' rows at once: :meth:`recommend_batches` streams them.
        """
        return joined_batches(list(self.recommend_batches(user_ids, k, extra_history, batch_users)))

    def recommend_batches(
        self,
        user_ids: Iterable[str],
        k: int,
        extra_history: "pd.DataFrame | RecentHistory | None" = None,
        batch_users: int | None = None,
    ) -> Iterator[pd.DataFrame]:
        """:meth:`recommend`'s rows one batch of users at a time, in the same order.

        Only one batch's scores (``batch_users x`` assortment float32, a buffer every batch
        reuses) and results are held at once. Each frame's ``attrs`` hold ``users`` (users of
        the batch) and ``unknown_users`` (of them, those the model did not know); a user
        without recommendations (they bought everything) has no rows.

        Raises
        ------
        ValueError
            If ``k`` or ``batch_users`` is below 1 (at the call, before any batch).
        """
        if k < 1:
            raise ValueError(f"Recommendations need k >= 1, got {k}.")
        size = users_per_batch(len(self.assortment)) if batch_users is None else batch_users
        if size < 1:
            raise ValueError(f"Batches need at least 1 user, got {size}.")
        users = list(dict.fromkeys(str(user) for user in user_ids))
        return self._recommend_batches(users, k, self.recent_history(extra_history), size)

    def _recommend_batches(
        self, users: list[str], k: int, extra: RecentHistory | None, size: int
    ) -> Iterator[pd.DataFrame]:
        indices = self._users.get_indexer(pd.Index(users, dtype=object)) if users else np.zeros(0, np.int64)
        scores = np.empty((min(size, len(users)), len(self.assortment)), dtype=np.float32)
        for start in range(0, len(users), size):
            batch = slice(start, start + size)
            frame = self._recommend_batch(users[batch], indices[batch], k, extra, scores)
            frame.attrs = {"users": len(users[batch]), "unknown_users": int((indices[batch] < 0).sum())}
            yield frame

    @torch.no_grad()
    def _recommend_batch(
        self, users: list[str], indices: np.ndarray, k: int, extra: RecentHistory | None, buffer: np.ndarray
    ) -> pd.DataFrame:
        histories = self._histories(users, indices, extra, as_of_test=False)
        vectors = np.ones((len(users), self._assortment_matrix.shape[1]), dtype=np.float32)
        vectors[:, :-1] = self._user_vectors(indices, histories).numpy()
        scores = buffer[: len(users)]
        np.matmul(vectors, self._assortment_matrix.T, out=scores)
        columns = self._column_of[histories.rows]
        bought = columns >= 0
        scores[histories.positions[bought], columns[bought]] = -np.inf
        top_scores, top_columns = top_k(scores, k)
        keep = np.isfinite(top_scores).ravel()
        width = top_scores.shape[1]
        return pd.DataFrame(
            {
                "userId": np.repeat(np.asarray(users, dtype=object), width)[keep],
                "rank": np.tile(np.arange(1, width + 1), len(users))[keep],
                "itemId": self._assortment_ids[top_columns.ravel()][keep],
                "score": top_scores.ravel()[keep].astype(np.float64),
            }
        )

    def score(
        self,
        pairs: pd.DataFrame,
        extra_history: "pd.DataFrame | RecentHistory | None" = None,
        as_of: Literal["serving", "test"] = "serving",
    ) -> pd.DataFrame:
        """Scores of ``(userId, itemId)`` pairs; higher means more likely to be bought.

        Parameters
        ----------
        pairs : pandas.DataFrame
            Columns ``userId`` and ``itemId``.
        extra_history : pandas.DataFrame or RecentHistory, optional
            As for :meth:`recommend`.
        as_of : {"serving", "test"}
            ``serving`` scores with everything known of each user; ``test`` with
            each user's history as the run's test evaluation saw it (the test item
            left out), which reproduces the run's test metrics on its candidates.

        Returns
        -------
        pandas.DataFrame
            Columns ``userId``, ``itemId``, ``score`` in the order of ``pairs``.
            An item the catalog does not list scores NaN (the model has no vector
            for it); an unknown user is scored as for :meth:`recommend`.
            ``attrs["unknown_users"]`` and ``attrs["unknown_items"]`` count the
            distinct unknown users and items.
        """
        if as_of not in ("serving", "test"):
            raise ValueError(f"as_of is 'serving' or 'test', got {as_of!r}.")
        if as_of == "test" and "refit" in self.manifest:
            raise ValueError(
                "This model is a refit for serving: it trained on the test interactions, so it cannot be scored "
                "as of the test evaluation."
            )
        if as_of == "test" and extra_history is not None:
            raise ValueError("Scoring as of the test evaluation takes no extra history.")
        missing = [column for column in ("userId", "itemId") if column not in pairs.columns]
        if missing:
            raise ValueError(f"Pairs to score need columns userId and itemId; missing {missing}.")
        user_codes, users = pd.factorize(pairs["userId"].astype(str))
        item_codes, items = pd.factorize(pairs["itemId"].astype(str))
        user_indices = self._users.get_indexer(users)
        rows = self._items.get_indexer(items)
        extra = self.recent_history(extra_history)
        scores = np.full(len(pairs), np.nan)
        with torch.no_grad():
            vectors = torch.empty((len(users), self.model.config.dim))
            for start in range(0, len(users), USER_BATCH):
                batch = slice(start, start + USER_BATCH)
                histories = self._histories(list(users[batch]), user_indices[batch], extra, as_of_test=as_of == "test")
                vectors[batch] = self._user_vectors(user_indices[batch], histories)
            item_vectors, item_bias = self._item_vectors(np.where(rows >= 0, rows, 0))
            for start in range(0, len(pairs), PAIR_BATCH):
                chunk = slice(start, start + PAIR_BATCH)
                u = torch.as_tensor(user_codes[chunk])
                i = torch.as_tensor(item_codes[chunk])
                scores[chunk] = ((vectors[u] * item_vectors[i]).sum(dim=-1) + item_bias[i]).numpy()
        scores[rows[item_codes] < 0] = np.nan
        result = pd.DataFrame(
            {
                "userId": pairs["userId"].astype(str).to_numpy(),
                "itemId": pairs["itemId"].astype(str).to_numpy(),
                "score": scores,
            }
        )
        result.attrs["unknown_users"] = int((user_indices < 0).sum())
        result.attrs["unknown_items"] = int((rows < 0).sum())
        return result

    def _histories(
        self, users: list[str], indices: np.ndarray, extra: RecentHistory | None, as_of_test: bool
    ) -> Histories:
        """Everything known of a batch of users: stored interactions, then extra ones, each item once."""
        known = indices >= 0
        starts = np.where(known, self._offsets[np.maximum(indices, 0)], 0)
        ends = np.where(known, self._offsets[np.maximum(indices, 0) + 1], 0)
        if as_of_test:
            ends = ends - np.where(known, self._test_held_out[np.maximum(indices, 0)], 0)
        positions, flat = ranges(starts, ends)
        rows = self._history[flat]
        if extra is None:
            return Histories(positions, rows)
        where = extra.users.get_indexer(pd.Index(users, dtype=object))
        found = where >= 0
        added_positions, added = ranges(
            np.where(found, extra.offsets[np.maximum(where, 0)], 0),
            np.where(found, extra.offsets[np.maximum(where, 0) + 1], 0),
        )
        positions = np.concatenate([positions, added_positions])
        rows = np.concatenate([rows, extra.rows[added]])
        # Group by user, stored interactions first; an item seen again counts once, at its latest.
        order = np.lexsort((np.arange(len(positions)), positions))
        positions, rows = positions[order], rows[order]
        keys = positions * self.catalog.size + rows
        _, last_from_end = np.unique(keys[::-1], return_index=True)
        keep = np.sort(len(keys) - 1 - last_from_end)
        return Histories(positions[keep], rows[keep])

    def _user_vectors(self, indices: np.ndarray, histories: Histories) -> torch.Tensor:
        """User vectors as the model's head makes them from each user's last history_length items.

        The mean of the encoded items is summed over the items a user has, not over a padded
        ``(users, history_length, dim)`` block: a batch of users with a few items each costs
        their items, not ``history_length`` slots each.
        """
        size, length = len(indices), self.history_length
        counts = np.bincount(histories.positions, minlength=size)
        first = np.cumsum(counts) - counts
        within = np.arange(len(histories.positions)) - np.repeat(first, counts)
        recent = within >= np.repeat(np.maximum(counts - length, 0), counts)
        positions = histories.positions[recent]
        unique_rows, inverse = np.unique(histories.rows[recent], return_inverse=True)
        encoded = self.model.encoder(torch.as_tensor(unique_rows, dtype=torch.long))
        pooled = torch.zeros((size, self.model.config.dim), dtype=encoded.dtype)
        pooled.index_add_(0, torch.as_tensor(positions, dtype=torch.long), encoded[torch.as_tensor(inverse)])
        pooled /= torch.as_tensor(np.maximum(np.bincount(positions, minlength=size), 1), dtype=pooled.dtype)[:, None]
        vectors = self.model.head.history_projection(pooled)
        if self.model.head.user_embedding is not None:
            known = torch.as_tensor(indices >= 0)
            vectors[known] += self.model.head.user_embedding.weight[torch.as_tensor(indices)[known]]
        return vectors


def joined_batches(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Batches of recommendations as one frame, their ``attrs["unknown_users"]`` summed."""
    result = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame({"userId": [], "rank": [], "itemId": [], "score": []})
    )
    result.attrs = {"unknown_users": sum(frame.attrs["unknown_users"] for frame in frames)}
    return result


def load_served_model(directory: str | Path, catalog: Catalog | None = None) -> ServedModel:
    """Read a served model written by :func:`write_served_model`.

    Parameters
    ----------
    directory : str or Path
        The served-model directory.
    catalog : Catalog, optional
        The catalog the caller serves with; refused unless its fingerprint is
        the one the model was trained with.

    Raises
    ------
    ServedModelError
        If the directory or one of its files is missing or unreadable, its format
        version is not this package's, its catalog does not match the manifest's
        fingerprint or the given catalog's, or the parameters do not fit the
        model config. One sentence names the directory and what does not match.
    """
    directory = Path(directory)
    manifest, stored = read_manifest(directory, catalog)
    try:
        market = read_mapped(directory / MARKET_FILE, MARKET_ENTRIES)
        # The model's sizes, checked against the catalog and the market's users before it is allocated.
        config = model_config(manifest.get("model_config"), stored.size, len(market["user_ids"]))
        model = SplitRecommender(config)
        # A table stored by its rows is expanded into the model's own: no second dense copy.
        stored_state = read_mapped(directory / MODEL_FILE)
        model.load_state_dict(expand_state(stored_state, into=model.state_dict()))
        del stored_state
        served = ServedModel(directory, manifest, model, stored, **market)
    except ServedModelError:
        raise
    except LOAD_ERRORS as err:
        reason = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
        reason = reason or type(err).__name__
        raise ServedModelError(
            f"The served model {directory} has unusable parameters or market data ({reason})."
        ) from err
    return served
