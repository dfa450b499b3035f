"""A loaded served model: the query object ``xmfl recommend`` and ``xmfl score`` ask.

:func:`load_served_model` reads and checks a directory in the format of
:mod:`common.serving.format` (one :class:`ServedModelError` naming what does not match);
:class:`ServedModel` answers top-k recommendations and candidate scores for the market's users
or for histories given at query time, in batches of bounded memory.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.neural.model import ModelConfig, SplitRecommender
from common.serving.format import (
    CATALOG_FILE,
    MANIFEST,
    MARKET_FILE,
    MODEL_FILE,
    READABLE_VERSIONS,
    ServedModelError,
    package_version,
)
from common.serving.sparse_state import expand_state

USER_BATCH = 1024  # users scored at once: 1024 x 6k items of float32 is 25 MB
PAIR_BATCH = 65536  # (user, item) pairs scored at once


@dataclass(frozen=True)
class _Histories:
    """Interactions of a batch of users, flat: ``positions[i]`` is the batch row of ``rows[i]``, oldest first."""

    positions: np.ndarray
    rows: np.ndarray


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
        self._assortment_rows = torch.as_tensor(rows, dtype=torch.long)
        self._column_of = np.full(catalog.size, -1, dtype=np.int64)
        self._column_of[rows] = np.arange(len(rows))
        with torch.no_grad():
            self._assortment_vectors = model.encoder(self._assortment_rows)
            self._assortment_bias = model.head.item_bias(self._assortment_rows).squeeze(-1)

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

    def recommend(self, user_ids: Iterable[str], k: int, extra_history: pd.DataFrame | None = None) -> pd.DataFrame:
        """Top ``k`` of the market's assortment for each user, without what the user already bought.

        Parameters
        ----------
        user_ids : Iterable[str]
            Users to recommend to, answered once each in first-seen order.
        k : int
            Recommendations per user; fewer when the user bought nearly all the assortment.
        extra_history : pandas.DataFrame, optional
            Recent interactions like a market file (``userId``, ``itemId``,
            optional ``date``; other columns ignored), after the known ones:
            they shape the user's vector and are excluded too.

        Returns
        -------
        pandas.DataFrame
            Columns ``userId``, ``rank`` (1 is best), ``itemId``, ``score``;
            ``attrs["unknown_users"]`` counts users the model did not know.
        """
        if k < 1:
            raise ValueError(f"Recommendations need k >= 1, got {k}.")
        users = list(dict.fromkeys(str(user) for user in user_ids))
        extra = self._extra(extra_history)
        indices = self._users.get_indexer(pd.Index(users, dtype=object)) if users else np.zeros(0, np.int64)
        frames = []
        for start in range(0, len(users), USER_BATCH):
            batch = slice(start, start + USER_BATCH)
            frames.append(self._recommend_batch(users[batch], indices[batch], k, extra))
        result = (
            pd.concat(frames, ignore_index=True)
            if frames
            else pd.DataFrame({"userId": [], "rank": [], "itemId": [], "score": []})
        )
        result.attrs["unknown_users"] = int((indices < 0).sum())
        return result

    @torch.no_grad()
    def _recommend_batch(
        self, users: list[str], indices: np.ndarray, k: int, extra: pd.DataFrame | None
    ) -> pd.DataFrame:
        histories = self._histories(users, indices, extra, as_of_test=False)
        vectors = self._user_vectors(indices, histories)
        scores = vectors @ self._assortment_vectors.T + self._assortment_bias
        columns = self._column_of[histories.rows]
        bought = columns >= 0
        scores[torch.as_tensor(histories.positions[bought]), torch.as_tensor(columns[bought])] = -torch.inf
        top_scores, top_columns = scores.topk(min(k, scores.shape[1]), dim=1)
        keep = torch.isfinite(top_scores).numpy().ravel()
        width = top_scores.shape[1]
        return pd.DataFrame(
            {
                "userId": np.repeat(np.asarray(users, dtype=object), width)[keep],
                "rank": np.tile(np.arange(1, width + 1), len(users))[keep],
                "itemId": np.asarray(self.assortment, dtype=object)[top_columns.numpy().ravel()][keep],
                "score": top_scores.numpy().ravel()[keep].astype(np.float64),
            }
        )

    def score(
        self,
        pairs: pd.DataFrame,
        extra_history: pd.DataFrame | None = None,
        as_of: Literal["serving", "test"] = "serving",
    ) -> pd.DataFrame:
        """Scores of ``(userId, itemId)`` pairs; higher means more likely to be bought.

        Parameters
        ----------
        pairs : pandas.DataFrame
            Columns ``userId`` and ``itemId``.
        extra_history : pandas.DataFrame, optional
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
        if as_of == "test" and extra_history is not None:
            raise ValueError("Scoring as of the test evaluation takes no extra history.")
        missing = [column for column in ("userId", "itemId") if column not in pairs.columns]
        if missing:
            raise ValueError(f"Pairs to score need columns userId and itemId; missing {missing}.")
        user_codes, users = pd.factorize(pairs["userId"].astype(str))
        item_codes, items = pd.factorize(pairs["itemId"].astype(str))
        user_indices = self._users.get_indexer(users)
        rows = self._items.get_indexer(items)
        extra = self._extra(extra_history)
        scores = np.full(len(pairs), np.nan)
        with torch.no_grad():
            vectors = (
                torch.cat(
                    [
                        self._user_vectors(
                            user_indices[start : start + USER_BATCH],
                            self._histories(
                                list(users[start : start + USER_BATCH]),
                                user_indices[start : start + USER_BATCH],
                                extra,
                                as_of_test=as_of == "test",
                            ),
                        )
                        for start in range(0, len(users), USER_BATCH)
                    ]
                )
                if len(users)
                else torch.zeros(0, self.model.config.dim)
            )
            known_rows = torch.as_tensor(np.where(rows >= 0, rows, 0))
            item_vectors = self.model.encoder(known_rows)
            item_bias = self.model.head.item_bias(known_rows).squeeze(-1)
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

    def _extra(self, extra_history: pd.DataFrame | None) -> pd.DataFrame | None:
        """``extra_history`` as columns ``userId``, ``row``, oldest first within each user."""
        if extra_history is None or extra_history.empty:
            return None
        missing = [column for column in ("userId", "itemId") if column not in extra_history.columns]
        if missing:
            raise ValueError(f"Extra history needs columns userId and itemId; missing {missing}.")
        frame = pd.DataFrame(
            {
                "userId": extra_history["userId"].astype(str).to_numpy(),
                "row": self.catalog.rows(extra_history["itemId"].astype(str)),
            }
        )
        if "date" in extra_history.columns:
            # As the split orders a market file: by date, undated first, file order breaking ties.
            dates = pd.to_datetime(extra_history["date"]).to_numpy()
            frame = frame.assign(date=dates).sort_values("date", kind="stable", na_position="first")
            frame = frame.drop(columns="date")
        return frame.reset_index(drop=True)

    def _histories(
        self, users: list[str], indices: np.ndarray, extra: pd.DataFrame | None, as_of_test: bool
    ) -> _Histories:
        """Everything known of a batch of users: stored interactions, then extra ones, each item once."""
        known = indices >= 0
        starts = np.where(known, self._offsets[np.maximum(indices, 0)], 0)
        ends = np.where(known, self._offsets[np.maximum(indices, 0) + 1], 0)
        if as_of_test:
            ends = ends - np.where(known, self._test_held_out[np.maximum(indices, 0)], 0)
        counts = ends - starts
        positions = np.repeat(np.arange(len(users)), counts)
        flat = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
        rows = self._history[flat]
        if extra is None:
            return _Histories(positions, rows)
        batch = pd.DataFrame({"userId": users, "position": np.arange(len(users))})
        added = extra.reset_index(names="order").merge(batch, on="userId").sort_values("order", kind="stable")
        positions = np.concatenate([positions, added["position"].to_numpy()])
        rows = np.concatenate([rows, added["row"].to_numpy()])
        # Group by user, stored interactions first; an item seen again counts once, at its latest.
        order = np.lexsort((np.arange(len(positions)), positions))
        positions, rows = positions[order], rows[order]
        keys = positions * self.catalog.size + rows
        _, last_from_end = np.unique(keys[::-1], return_index=True)
        keep = np.sort(len(keys) - 1 - last_from_end)
        return _Histories(positions[keep], rows[keep])

    def _user_vectors(self, indices: np.ndarray, histories: _Histories) -> torch.Tensor:
        """User vectors as the model's head makes them from each user's last history_length items."""
        size, length = len(indices), self.history_length
        counts = np.bincount(histories.positions, minlength=size)
        first = np.cumsum(counts) - counts
        within = np.arange(len(histories.positions)) - np.repeat(first, counts)
        dropped = np.repeat(np.maximum(counts - length, 0), counts)
        recent = within >= dropped
        history = torch.zeros((size, length), dtype=torch.long)
        mask = torch.zeros((size, length), dtype=torch.float32)
        positions = torch.as_tensor(histories.positions[recent])
        columns = torch.as_tensor((within - dropped)[recent])
        history[positions, columns] = torch.as_tensor(histories.rows[recent])
        mask[positions, columns] = 1.0
        unique_rows, inverse = torch.unique(history, return_inverse=True)
        encoded = self.model.encoder(unique_rows)[inverse]
        pooled = torch.einsum("bl,bld->bd", mask, encoded) / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
        vectors = self.model.head.history_projection(pooled)
        if self.model.head.user_embedding is not None:
            known = torch.as_tensor(indices >= 0)
            vectors[known] += self.model.head.user_embedding.weight[torch.as_tensor(indices)[known]]
        return vectors


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
    if not directory.is_dir():
        raise ServedModelError(f"{directory} is not a served model: there is no such directory.")
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServedModelError(f"{directory} is not a served model: it has no {MANIFEST}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ServedModelError(f"The served model {directory} has an unreadable {MANIFEST} ({err}).") from err
    if not isinstance(manifest, dict):
        raise ServedModelError(f"The served model {directory} has a {MANIFEST} that is not a JSON object.")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ServedModelError(
            f"The served model {directory} has format version {version!r} (written by xmarket-fl "
            f"{manifest.get('package_version', 'unknown')}), but xmarket-fl {package_version()} reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))} only."
        )
    try:
        stored = Catalog.load(directory / CATALOG_FILE)
    except (OSError, ValueError) as err:
        raise ServedModelError(f"The served model {directory} has an unusable catalog: {err}") from err
    expected = manifest.get("catalog_fingerprint")
    if stored.fingerprint() != expected:
        raise ServedModelError(
            f"The served model {directory} holds a catalog ({stored.fingerprint()}) that is not "
            f"the one its manifest names ({expected})."
        )
    if catalog is not None and catalog.fingerprint() != expected:
        raise ServedModelError(
            f"The served model {directory} was trained on another catalog ({expected}) "
            f"than the one given ({catalog.fingerprint()})."
        )
    try:
        config = ModelConfig(**manifest["model_config"])
        model = SplitRecommender(config)
        model.load_state_dict(expand_state(torch.load(directory / MODEL_FILE, weights_only=True)))
        market = torch.load(directory / MARKET_FILE, weights_only=True)
        served = ServedModel(directory, manifest, model, stored, **market)
    except ServedModelError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, EOFError) as err:
        reason = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
        reason = reason or type(err).__name__
        raise ServedModelError(
            f"The served model {directory} has unusable parameters or market data ({reason})."
        ) from err
    return served
