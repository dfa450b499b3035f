"""A market's servable model: what a region needs to recommend to its own users, and nothing more.

A served-model directory ``DIR/`` holds four files, each 0600 (a head can hold
per-user vectors, and histories are personal data):

* ``manifest.json``: format version, method, market, round, the validation and
  test metrics of that round, epsilon and delta spent (None without DP), the
  catalog's fingerprint, the package version and the :class:`ModelConfig`;
* ``model.pt``: the full model's parameters, shared part and head (user rows of
  other markets cut away when the model was pooled over several markets), a
  mostly-zero table by its non-zero rows (:mod:`common.sparse_state`: fedals'
  items outside the market's assortment over a large catalog);
* ``catalog.txt``: the catalog the model's item rows mean (:meth:`Catalog.save`);
* ``market.pt``: the market's user IDs (in the split's user order), each
  user's known interactions as catalog rows, oldest first (training items, then
  the validation and the test item: serving comes after evaluation), which of
  them the run held out as the test item (to reproduce the run's test
  evaluation), and the market's assortment as item IDs.

The directory is written into a temporary sibling and renamed into place, so a
reader sees the old model or the new one, never half of one. Only the items a
market sells that the catalog names can be recommended: items that landed in
the catalog's hashed overflow rows have no ID to give back (the manifest counts
them); they still count in histories, as they did in training.
"""

import importlib.metadata
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from common.catalog import Catalog
from common.durable import atomic_replace_directory
from common.model import ModelConfig, SplitRecommender
from common.sparse_state import compact_state, expand_state
from common.train import MarketTensors

FORMAT = "xmarket-fl served model"
FORMAT_VERSION = 2  # 2: model.pt may store mostly-zero tables by their rows
READABLE_VERSIONS = (1, 2)  # version 1 is version 2 with every table dense
MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
MARKET_FILE = "market.pt"
CATALOG_FILE = "catalog.txt"
SERVED_FILES = (MANIFEST, MODEL_FILE, MARKET_FILE, CATALOG_FILE)
# What the caller of write_served_model says about the training; the rest is added.
CALLER_KEYS = ("method", "market", "round", "metrics", "epsilon", "delta")
PACKAGE = "xmarket-fl"
_WRITTEN_KEYS = (
    "format",
    "format_version",
    "catalog_fingerprint",
    "package_version",
    "model_config",
    "users",
    "assortment_items",
    "unnamed_overflow_items",
    "written",
)
USER_BATCH = 1024  # users scored at once: 1024 x 6k items of float32 is 25 MB
PAIR_BATCH = 65536  # (user, item) pairs scored at once


class ServedModelError(ValueError):
    """A served-model directory cannot be used: the message names it and what does not match."""


def market_user_ids(interactions: pd.DataFrame) -> list[str]:
    """The market's user IDs in the order :func:`common.split.split_market` numbers its users.

    Parameters
    ----------
    interactions : pandas.DataFrame
        The market's table as :func:`common.data.read_interactions` returns it
        (column ``user``), the table the split was made from.
    """
    _, uniques = pd.factorize(interactions["user"], sort=True)
    return [str(user) for user in uniques]


def package_version() -> str:
    """The installed version of this package, or ``unknown`` when it runs uninstalled."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_served_model(
    directory: str | Path,
    model: SplitRecommender,
    data: MarketTensors,
    catalog: Catalog,
    manifest: dict[str, Any],
    *,
    user_ids: Sequence[str] | None = None,
) -> None:
    """Write ``model`` as the served model of ``data``'s market into ``directory``, atomically.

    Parameters
    ----------
    directory : str or Path
        The served-model directory; replaced whole if it holds a served model
        already, refused if it exists and holds something else.
    model : SplitRecommender
        The trained model (shared part and head). A model over several markets'
        users (the pooled baseline) is cut to this market's users by
        ``data.user_offset``.
    data : MarketTensors
        The market's split as the model was trained and evaluated on.
    catalog : Catalog
        The catalog the model's item rows mean.
    manifest : dict
        ``{"method", "market", "round", "metrics": {...}, "epsilon", "delta"}``
        (epsilon and delta None without DP; a NaN metric, not measured, is
        written as null); format version, catalog fingerprint, package
        version and model config are added here.
    user_ids : Sequence[str], optional
        The market's user IDs in split order (:func:`market_user_ids` of the
        table the split was made from). Default: ``data.split.user_ids`` if the
        split carries them.

    Raises
    ------
    ValueError
        If the manifest lacks a key or names another market, its values are not
        finite JSON, the user IDs are missing or do not fit the split, the model
        does not fit the catalog, or ``directory`` holds something that is not a
        served model.
    """
    directory = Path(directory)
    split = data.split
    if user_ids is None:
        carried = getattr(split, "user_ids", None)
        user_ids = carried if carried is not None and len(carried) else None
    users = _checked_user_ids(user_ids, data)
    missing = [key for key in CALLER_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"The served model's manifest lacks {missing}; the caller gives {list(CALLER_KEYS)}.")
    if manifest["market"] != split.market:
        raise ValueError(f"The manifest names market {manifest['market']!r} but the data is market {split.market!r}.")
    config = model.config
    if config.num_items != catalog.size:
        raise ValueError(
            f"The model has {config.num_items} item rows but the catalog has {catalog.size}: "
            "it was not trained on this catalog."
        )
    served_config = replace(config, num_users=split.num_users)
    state = _market_state(model, data)
    offsets, items = _full_histories(data)
    test_held_out = np.zeros(split.num_users, dtype=bool)
    test_held_out[split.test.users] = True
    known = len(catalog.item_ids)
    assortment_rows = np.asarray(split.market_items)
    named = assortment_rows[assortment_rows < known]
    market = {
        "user_ids": users,
        "history_offsets": torch.as_tensor(offsets),
        "history_items": torch.as_tensor(items),
        "test_held_out": torch.as_tensor(test_held_out),
        "assortment": [catalog.item_ids[row] for row in named.tolist()],
    }
    metrics = {
        # NaN means "not measured" (e.g. a full ranking that was skipped): null in JSON.
        key: None if isinstance(value, float | np.floating) and np.isnan(value) else value
        for key, value in dict(manifest["metrics"]).items()
    }
    full_manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **{key: manifest[key] for key in CALLER_KEYS},
        "metrics": metrics,
        # Anything else the caller adds, but never in place of what is fixed here.
        **{key: value for key, value in manifest.items() if key not in (*CALLER_KEYS, *_WRITTEN_KEYS)},
        "catalog_fingerprint": catalog.fingerprint(),
        "package_version": package_version(),
        "model_config": asdict(served_config),
        "users": split.num_users,
        "assortment_items": len(named),
        "unnamed_overflow_items": int(len(assortment_rows) - len(named)),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        manifest_text = json.dumps(full_manifest, indent=2, allow_nan=False, default=_plain_number) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"The served model's manifest is not finite JSON ({err}).") from err
    files = {
        MANIFEST: manifest_text.encode("utf-8"),
        MODEL_FILE: _torch_bytes(compact_state(state)),
        MARKET_FILE: _torch_bytes(market),
        CATALOG_FILE: catalog.to_bytes(),
    }
    atomic_replace_directory(directory, files, marker=MANIFEST, kind="served model")


def _plain_number(value: Any) -> Any:
    """numpy and 0-d torch scalars as Python numbers for JSON; anything else is refused."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _checked_user_ids(user_ids: Sequence[str] | None, data: MarketTensors) -> list[str]:
    if user_ids is None:
        raise ValueError(
            f"Serving market '{data.split.market}' needs its user IDs: pass "
            "user_ids=market_user_ids(interactions) of the table the split was made from."
        )
    users = [str(user) for user in user_ids]
    if len(users) != data.split.num_users:
        raise ValueError(
            f"Market '{data.split.market}' has {data.split.num_users} users in its split "
            f"but {len(users)} user IDs were given."
        )
    if len(set(users)) != len(users):
        raise ValueError(f"The user IDs given for market '{data.split.market}' repeat a user.")
    return users


def _market_state(model: SplitRecommender, data: MarketTensors) -> dict[str, torch.Tensor]:
    """The model's parameters with user rows cut to this market's users."""
    state = {name: value.detach().clone().cpu() for name, value in model.state_dict().items()}
    name = "head.user_embedding.weight"
    if name in state:
        rows = slice(data.user_offset, data.user_offset + data.split.num_users)
        if rows.stop > len(state[name]):
            raise ValueError(
                f"The model has {len(state[name])} user rows; market '{data.split.market}' "
                f"needs rows {rows.start} to {rows.stop - 1}."
            )
        state[name] = state[name][rows].clone()
    return state


def _full_histories(data: MarketTensors) -> tuple[np.ndarray, np.ndarray]:
    """Every user's interactions as catalog rows, oldest first: training, then validation, then test."""
    split = data.split
    users = np.concatenate([split.train_users, split.valid.users, split.test.users]).astype(np.int64)
    items = np.concatenate([split.train_items, split.valid.candidates[:, 0], split.test.candidates[:, 0]]).astype(
        np.int64
    )
    stage = np.concatenate(
        [np.zeros(len(split.train_users)), np.ones(len(split.valid.users)), np.full(len(split.test.users), 2)]
    )
    # train_users is grouped by user in date order (see split_market): keep that order.
    order = np.lexsort((np.arange(len(users)), stage, users))
    counts = np.bincount(users, minlength=split.num_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, items[order]


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_served_model(directory: str | Path, catalog: Catalog | None = None) -> "ServedModel":
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


# --- Files a region serves from: user lists, candidate pairs, recent histories, results.
