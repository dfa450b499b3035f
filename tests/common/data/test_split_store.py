"""The split store: a market split once, memory-mapped, the same split as made in memory."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data import markets
from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_split
from common.data.split import MarketSplit, split_market
from common.data.split_store import SPLIT_STORE_ENV, split_key, stored_split


def _frame(users: int = 40, items: int = 160) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = [(f"u{user}", f"i{item}") for user in range(users) for item in rng.choice(items, 4, replace=False)]
    return pd.DataFrame(
        {
            "user": [user for user, _ in rows],
            "item": [item for _, item in rows],
            "rating": 5.0,
            "date": pd.to_datetime("2020-01-01") + pd.to_timedelta(np.arange(len(rows)), unit="D"),
            "position": range(len(rows)),
        }
    )


def _assert_same(stored: MarketSplit, made: MarketSplit) -> None:
    assert (stored.market, stored.num_users) == (made.market, made.num_users)
    for name in ("train_users", "train_items", "market_items"):
        np.testing.assert_array_equal(getattr(stored, name), getattr(made, name))
    for part in ("valid", "test"):
        np.testing.assert_array_equal(getattr(stored, part).users, getattr(made, part).users)
        np.testing.assert_array_equal(getattr(stored, part).candidates, getattr(made, part).candidates)
    assert list(stored.user_ids) == list(made.user_ids)


def test_a_stored_split_is_the_split_made_in_memory_and_is_made_once(tmp_path):
    # Prepare
    frame = _frame()
    catalog = Catalog.from_items(frame["item"])
    made = split_market("m", frame, catalog, 0)
    calls = []

    def make() -> MarketSplit:
        calls.append(1)
        return split_market("m", frame, catalog, 0)

    # Execute: asked for twice, as two workers would
    first = stored_split(tmp_path, "k", make)
    second = stored_split(tmp_path, "k", make)

    # Assert: made once, the same arrays, mapped copy-on-write from the file
    assert len(calls) == 1
    _assert_same(first, made)
    _assert_same(second, made)
    assert isinstance(second.valid.candidates, np.memmap) and second.valid.candidates.mode == "c"
    second.train_items[0] = -7  # a write changes this process's copy, never the stored file
    assert stored_split(tmp_path, "k", make).train_items[0] == made.train_items[0]


def test_a_split_left_half_written_is_made_again(tmp_path):
    # Prepare: a directory under the key without its closing split.json, as a stopped writer leaves
    frame = _frame()
    catalog = Catalog.from_items(frame["item"])
    (tmp_path / "k").mkdir()
    np.save(tmp_path / "k" / "train_users.npy", np.zeros(3, dtype=np.int64))

    # Execute
    stored = stored_split(tmp_path, "k", lambda: split_market("m", frame, catalog, 0))

    # Assert
    _assert_same(stored, split_market("m", frame, catalog, 0))


def test_the_key_changes_with_every_part():
    # Prepare
    parts = ["/data/m.csv", 100, 5, "m", 0, "catalog"]

    # Execute
    keys = {split_key(*parts[:n], "changed", *parts[n + 1 :]) for n in range(len(parts))}

    # Assert
    assert len(keys | {split_key(*parts)}) == len(parts) + 1


def test_load_split_goes_through_the_store_only_where_the_environment_names_one(tmp_path, monkeypatch):
    # Prepare: one market file
    frame = _frame()
    data = tmp_path / "data"
    data.mkdir()
    frame.assign(date=frame["date"].dt.strftime("%Y-%m-%d")).rename(columns={"user": "userId", "item": "itemId"}).drop(
        columns="position"
    ).to_csv(data / "m.csv", index=False)
    source = MarketSource(str(data))
    catalog = source.catalog()
    load_split.cache_clear()
    in_memory = load_split(source, "m", catalog)
    load_split.cache_clear()
    monkeypatch.setenv(SPLIT_STORE_ENV, str(tmp_path / "store"))

    # Execute
    stored = load_split(source, "m", catalog)
    load_split.cache_clear()

    # Assert: the same split, from files in the store
    assert not isinstance(in_memory.train_items, np.memmap)
    assert isinstance(stored.train_items, np.memmap)
    _assert_same(stored, in_memory)
    assert len([path for path in Path(tmp_path / "store").iterdir() if path.is_dir()]) == 1
    with pytest.raises(KeyError, match="No market 'x'"):
        load_split(source, "x", catalog)
    load_split.cache_clear()
    assert os.environ[SPLIT_STORE_ENV] and markets.split_store() == tmp_path / "store"
