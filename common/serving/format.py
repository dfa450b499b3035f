"""A market's servable model on disk: what a region needs to recommend to its own users, and nothing more.

A served-model directory ``DIR/`` holds four files, each 0600 (a head can hold
per-user vectors, and histories are personal data):

* ``manifest.json``: format version, method, market, round, the validation and
  test metrics of that round, epsilon and delta spent (None without DP), the
  catalog's fingerprint, the package version and the :class:`ModelConfig`;
* ``model.pt``: the full model's parameters, shared part and head (user rows of
  other markets cut away when the model was pooled over several markets), a
  mostly-zero table by its non-zero rows (:mod:`common.serving.sparse_state`: fedals'
  items outside the market's assortment over a large catalog);
* ``catalog.txt``: the catalog the model's item rows mean (:meth:`Catalog.save`);
* ``market.pt``: the market's user IDs (in the split's user order), each
  user's known interactions as catalog rows, oldest first (training items, then
  the validation and the test item: serving comes after evaluation), which of
  them the run held out as the test item (to reproduce the run's test
  evaluation), and the market's assortment as item IDs.

The directory is written into a temporary sibling and renamed into place, so a
reader sees the old model or the new one, never half of one. :func:`common.serving.query.load_served_model`
reads it back into the query object. Only the items a
market sells that the catalog names can be recommended: items that landed in
the catalog's hashed overflow rows have no ID to give back (the manifest counts
them); they still count in histories, as they did in training.
"""

import importlib.metadata
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.data.split import MarketSplit
from common.neural.model import SplitRecommender
from common.neural.train import MarketTensors
from common.runtime.durable import atomic_replace_directory
from common.serving.sparse_state import compact_state

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
    offsets, items = full_histories(split)
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


def full_histories(split: MarketSplit) -> tuple[np.ndarray, np.ndarray]:
    """Every user's interactions as catalog rows, oldest first: training, then validation, then test.

    Returns the offsets ``(users + 1,)`` of each user's rows and the rows: what a served model
    keeps of the market, and what a refit for serving pools as each user's history.
    """
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


def read_manifest(directory: Path, catalog: Catalog | None = None) -> tuple[dict[str, Any], Catalog]:
    """The manifest and the catalog of the served model in ``directory``, checked (format version,
    the catalog's fingerprint against the manifest's and against ``catalog``'s when given).

    Raises
    ------
    ServedModelError
        In one sentence naming the directory and what does not match.
    """
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
    return manifest, stored
