"""The leave-one-out split and the seeded evaluation negatives."""

import numpy as np
import pandas as pd
import pytest

from common.data.catalog import Catalog
from common.data.split import NUM_NEGATIVES, split_market


def _interactions(rows: list[tuple[str, str, str | None]]) -> pd.DataFrame:
    users, items, dates = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user": list(users),
            "item": list(items),
            "rating": 5.0,
            "date": pd.to_datetime(list(dates)),
            "position": range(len(rows)),
        }
    )


def _market(extra_items: int = 150) -> tuple[pd.DataFrame, Catalog]:
    # Filler users make the market large enough for 99 negatives.
    rows = [
        ("alice", "i1", "2020-01-03"),
        ("alice", "i2", "2020-01-01"),
        ("alice", "i3", "2020-01-02"),
        ("alice", "i4", "2020-01-02"),  # same day as i3: file order puts i4 later
        ("bob", "i1", "2020-02-01"),
        ("bob", "i5", "2020-02-02"),
    ]
    rows += [(f"f{n}", f"x{n}", "2019-01-01") for n in range(extra_items)]
    frame = _interactions(rows)
    return frame, Catalog.from_items(frame["item"])


def test_last_interaction_is_test_second_last_is_validation():
    # Prepare: alice's date order is i2, i3, i4 (file order breaks the tie), i1.
    frame, catalog = _market()

    # Execute
    split = split_market("de", frame, catalog, seed=0)

    # Assert
    users = {name: index for index, name in enumerate(sorted(frame["user"].unique()))}
    alice = users["alice"]
    rows = catalog.rows(["i1", "i2", "i3", "i4"])
    test_row = split.test.candidates[split.test.users == alice][0]
    valid_row = split.valid.candidates[split.valid.users == alice][0]
    assert test_row[0] == rows[0]  # i1, the latest
    assert valid_row[0] == rows[3]  # i4, after i3 by file order
    assert sorted(split.train_items[split.train_users == alice]) == sorted(rows[[1, 2]])


def test_users_with_fewer_than_three_interactions_only_train():
    frame, catalog = _market()

    split = split_market("de", frame, catalog, seed=0)

    bob = sorted(frame["user"].unique()).index("bob")
    assert bob not in split.test.users
    assert bob not in split.valid.users
    assert (split.train_users == bob).sum() == 2


def test_negatives_are_unseen_distinct_market_items():
    frame, catalog = _market()

    split = split_market("de", frame, catalog, seed=3)

    alice = sorted(frame["user"].unique()).index("alice")
    seen = set(catalog.rows(["i1", "i2", "i3", "i4"]))
    negatives = split.test.candidates[split.test.users == alice][0, 1:]
    assert len(negatives) == NUM_NEGATIVES == len(set(negatives))
    assert not seen & set(negatives)
    assert set(negatives) <= set(split.market_items)


def test_split_is_deterministic_and_seeded():
    frame, catalog = _market()

    first = split_market("de", frame, catalog, seed=7)
    again = split_market("de", frame, catalog, seed=7)
    other_seed = split_market("de", frame, catalog, seed=8)
    other_market = split_market("fr", frame, catalog, seed=7)

    np.testing.assert_array_equal(first.test.candidates, again.test.candidates)
    np.testing.assert_array_equal(first.train_items, again.train_items)
    assert not np.array_equal(first.test.candidates, other_seed.test.candidates)
    assert not np.array_equal(first.test.candidates, other_market.test.candidates)


def test_a_market_too_small_for_99_negatives_is_refused():
    frame, catalog = _market(extra_items=50)

    with pytest.raises(ValueError, match="99 unseen items"):
        split_market("in", frame, catalog, seed=0)
