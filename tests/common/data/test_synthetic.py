"""The synthetic federation: deterministic, uneven, and shaped like XMarket."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.interactions import read_interactions
from common.data.synthetic import (
    SyntheticConfig,
    _popularity_pool,
    generate_markets,
    market_names,
    write_markets,
)


def test_generation_is_deterministic_under_a_seed():
    config = SyntheticConfig(markets=3, seed=5)

    first, again = generate_markets(config), generate_markets(config)
    other = generate_markets(SyntheticConfig(markets=3, seed=6))

    for market in first:
        pd.testing.assert_frame_equal(first[market], again[market])
    assert not first["m00"].equals(other["m00"])


def test_market_sizes_are_uneven_and_users_have_five_interactions():
    tables = generate_markets(SyntheticConfig(markets=8, seed=0))

    users = [table["userId"].nunique() for table in tables.values()]
    per_user = pd.concat(tables.values()).groupby("userId").size()

    assert users == sorted(users, reverse=True)
    assert users[0] >= 10 * users[-1]
    assert per_user.min() >= 5


def test_markets_share_part_of_their_catalogs():
    tables = generate_markets(SyntheticConfig(markets=3, seed=0))

    items = [set(table["itemId"]) for table in tables.values()]

    shared = items[0] & items[1]
    assert 0.3 * len(items[0]) < len(shared) < len(items[0])


def test_written_markets_load_through_the_ordinary_reader(tmp_path):
    paths = write_markets(SyntheticConfig(markets=2, seed=0), tmp_path)

    frames = {market: read_interactions(path) for market, path in paths.items()}

    assert list(frames) == market_names(2)
    assert all(len(frame) > 0 for frame in frames.values())


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one market"):
        SyntheticConfig(markets=0)


def test_a_large_catalog_generates_from_candidates_with_distinct_items_per_user():
    # 200,000 products: scoring every product for every user would need gigabytes of logits.
    config = SyntheticConfig(markets=3, items=200_000, largest_market_users=500, candidates=256, seed=0)

    tables = generate_markets(config)
    again = generate_markets(config)

    for market, table in tables.items():
        pd.testing.assert_frame_equal(table, again[market])
        assert not table.duplicated(["userId", "itemId"]).any()
        assert table.groupby("userId").size().min() >= 5
    touched = [table["itemId"].nunique() for table in tables.values()]
    assert touched == sorted(touched, reverse=True)  # bigger markets touch more of the catalog
    assert max(touched) < config.items / 10


def test_too_few_candidates_per_interaction_are_refused():
    with pytest.raises(ValueError, match="candidates"):
        SyntheticConfig(mean_interactions=10, candidates=20)


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40),
    rows=st.integers(1, 30),
    width=st.integers(1, 9),
    chunk=st.integers(1, 31),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_chunked_popularity_pool_draws_what_numpy_choice_draws(weights, rows, width, chunk, seed):
    # Prepare: a popularity distribution, and numpy's own draw of the pool from one generator.
    p = np.asarray(weights) / np.sum(weights)
    expected = np.random.default_rng(seed).choice(len(p), size=(rows, width), p=p)

    # Execute: the same draw chunk by chunk from an identically seeded generator.
    pool = _popularity_pool(np.random.default_rng(seed), p, (rows, width), chunk)

    # Assert: the same items, so that generated federations do not change with the chunking.
    np.testing.assert_array_equal(pool, expected)
    assert pool.dtype == np.int32
