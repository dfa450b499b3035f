"""rerank's features: tables of what a market knows at one moment, and the features of candidate lists."""

import numpy as np
import pandas as pd
import pytest

import common.rerank.features as features_module
from common.data.catalog import Catalog
from common.data.split import split_market
from common.rerank.features import (
    FEATURE_NAMES,
    FeatureTables,
    MarketContext,
    _rank_above,
    interaction_days,
    market_contexts,
)

ITEMS = np.array([10, 20, 30, 40])  # the market's assortment (catalog rows)


def _context() -> MarketContext:
    """Three users: 0 bought 10 then 20, 1 bought 10, 20, 30, 2 bought 30; days 1 to 6 in that order."""
    return MarketContext(
        num_users=3,
        users=np.array([0, 0, 1, 1, 1, 2]),
        items=np.array([10, 20, 10, 20, 30, 30]),
        days=np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    )


def _features(users, candidates, scores, norms=(0.0, 1.0, 2.0, 0.0)) -> dict[str, np.ndarray]:
    tables = FeatureTables.build(_context(), ITEMS, np.array(norms))
    values = tables.list_features(np.array(users), np.array(candidates), np.array(scores, dtype=float))
    return {name: values[..., n] for n, name in enumerate(FEATURE_NAMES)}


def test_cooccurrence_counts_the_market_users_who_bought_both_items():
    # Prepare: pairs bought together: (10, 20) by users 0 and 1; (10, 30) and (20, 30) by user 1.
    # User 2's one item is 30; user 0's items are 10 and then 20 (20 the latest).

    # Execute
    features = _features([2, 0], [[10, 20, 40], [30, 40, 40]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])

    # Assert
    np.testing.assert_allclose(features["co-sum"], np.log1p([[1, 1, 0], [2, 0, 0]]))
    np.testing.assert_allclose(features["co-max"], np.log1p([[1, 1, 0], [1, 0, 0]]))
    np.testing.assert_allclose(features["co-last"], np.log1p([[1, 1, 0], [1, 0, 0]]))  # C[20, 30] = 1
    # co-share: the sum over the candidate's interactions plus one (30 was bought twice).
    np.testing.assert_allclose(features["co-share"], [[1 / 3, 1 / 3, 0], [2 / 3, 0, 0]])


@pytest.mark.parametrize("cells", [1, 2, 3, 5])
def test_cooccurrence_in_slices_of_a_few_keys_is_the_same(monkeypatch, cells):
    # Prepare: the lookups bounded to a handful of keys, so that candidates are sliced and users go one by one
    users, candidates = [2, 0, 1], [[10, 20, 40], [30, 40, 40], [10, 30, 20]]
    scores = [[0.0, 0.0, 0.0]] * 3
    expected = _features(users, candidates, scores)
    monkeypatch.setattr(features_module, "LOOKUP_CELLS", cells)

    # Execute
    sliced = _features(users, candidates, scores)

    # Assert
    for name in ("co-sum", "co-max", "co-last", "co-share"):
        np.testing.assert_array_equal(sliced[name], expected[name])


def test_popularity_federation_user_and_recency_features():
    # Prepare: item counts 10: 2, 20: 2, 30: 2, 40: 0; item 20 last sold on day 4, first on day 2;
    # user 0's latest day is 2, user 2's is 6.

    # Execute
    features = _features([0, 2], [[20, 40], [20, 30]], [[0.0, 0.0], [0.0, 0.0]])

    # Assert
    np.testing.assert_allclose(features["market-count"], np.log1p([[2, 0], [2, 2]]))
    np.testing.assert_allclose(features["federation-norm"], [[1.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(features["federation-has-factor"], [[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(features["history-length"], np.log1p([[2, 2], [1, 1]]))
    np.testing.assert_allclose(features["days-since-last-sale"], [[2 - 4, np.nan], [6 - 4, 6 - 6]])
    np.testing.assert_allclose(features["days-since-first-sale"], [[2 - 2, np.nan], [6 - 2, 6 - 5]])


def test_retrieval_features_are_the_score_its_rank_and_its_gap_to_the_best():
    # Prepare / Execute
    features = _features([1, 0], [[10, 20, 30], [10, 20, 30]], [[0.5, 0.9, 0.1], [0.0, 0.3, 0.0]])

    # Assert
    np.testing.assert_allclose(features["fedals-score"], [[0.5, 0.9, 0.1], [0.0, 0.3, 0.0]])
    np.testing.assert_allclose(features["fedals-gap"], [[-0.4, 0.0, -0.8], [-0.3, 0.0, -0.3]])
    # Tied candidates share a rank: the held-out item (column 0) must not win ties by its position.
    np.testing.assert_allclose(features["fedals-rank"], [[1, 0, 2], [1, 0, 1]])


def test_the_rank_by_sorting_counts_the_strictly_higher_candidates_of_each_list():
    # Prepare: lists with many ties and -inf (the padding of served lists), hand-checked on one.
    rng = np.random.default_rng(0)
    lists = rng.integers(0, 5, size=(30, 40)).astype(np.float64)
    lists[rng.random(lists.shape) < 0.1] = -np.inf

    # Execute
    ranks = _rank_above(lists)
    small = _rank_above(np.array([[3.0, -np.inf, 3.0, 7.0, -np.inf]]))

    # Assert: the definition, pairwise.
    np.testing.assert_array_equal(ranks, (lists[:, None, :] > lists[:, :, None]).sum(axis=2))
    np.testing.assert_array_equal(small, [[1, 3, 1, 0, 3]])


def test_a_user_without_items_has_no_cooccurrence():
    # Prepare: user 1 of two has no interaction at all.
    context = MarketContext(2, np.array([0, 0]), np.array([10, 20]), np.array([np.nan, np.nan]))
    tables = FeatureTables.build(context, ITEMS, np.zeros(4))

    # Execute
    values = tables.list_features(np.array([1, 0]), np.array([[10, 20], [30, 20]]), np.zeros((2, 2)))

    # Assert
    co_sum = values[..., FEATURE_NAMES.index("co-sum")]
    np.testing.assert_allclose(co_sum, np.log1p([[0, 0], [0, 1]]))  # user 0's 10 was bought with 20
    assert np.isnan(values[..., FEATURE_NAMES.index("days-since-last-sale")]).all()  # no dates


def test_the_tables_round_trip_through_their_arrays():
    # Prepare
    tables = FeatureTables.build(_context(), ITEMS, np.arange(4.0))

    # Execute
    again = FeatureTables.from_arrays(tables.arrays())

    # Assert
    for name, array in tables.arrays().items():
        np.testing.assert_array_equal(getattr(again, name), array)
    with pytest.raises(ValueError, match="lack"):
        FeatureTables.from_arrays({"items": ITEMS})


def test_a_candidate_outside_the_assortment_is_refused():
    tables = FeatureTables.build(_context(), ITEMS, np.zeros(4))

    with pytest.raises(ValueError, match="outside the market's assortment"):
        tables.list_features(np.array([0]), np.array([[10, 11]]), np.zeros((1, 2)))


def _split_market() -> tuple[pd.DataFrame, Catalog]:
    """alice: i2 (day 1), i3 (day 2), i1 (day 3), i1 again (day 5); bob: i1, i5, i6; fillers for negatives."""
    rows = [
        ("alice", "i2", "2020-01-01"),
        ("alice", "i3", "2020-01-02"),
        ("alice", "i1", "2020-01-03"),
        ("alice", "i4", "2020-01-04"),
        ("alice", "i1", "2020-01-05"),  # a repeat: the split keeps the latest, which is alice's test item
        ("bob", "i1", "2020-02-01"),
        ("bob", "i5", "2020-02-02"),
        ("bob", "i6", "2020-02-03"),
    ]
    rows += [(f"f{n}", f"x{n}", "2019-01-01") for n in range(150)]
    users, items, dates = zip(*rows, strict=True)
    frame = pd.DataFrame(
        {
            "user": list(users),
            "item": list(items),
            "rating": 5.0,
            "date": pd.to_datetime(list(dates), utc=True),
            "position": range(len(rows)),
        }
    )
    return frame, Catalog.from_items(frame["item"])


def test_validation_lists_know_training_alone_and_test_lists_add_validation_never_test():
    # Prepare: alice trains on i2, i3; validates on i4; tests on i1 (its latest, day 5).
    frame, catalog = _split_market()
    split = split_market("m", frame, catalog, seed=0)
    alice = split.user_ids.index("alice")
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    day = {d: (pd.Timestamp(d, tz="UTC") - epoch).days for d in ("2020-01-01", "2020-01-02", "2020-01-04")}

    # Execute
    train_days, valid_days = interaction_days(split, frame, catalog)
    valid_context, test_context = market_contexts(split, train_days, valid_days)

    # Assert
    mine = valid_context.users == alice
    assert valid_context.items[mine].tolist() == catalog.rows(pd.Series(["i2", "i3"])).tolist()
    np.testing.assert_allclose(valid_context.days[mine], [day["2020-01-01"], day["2020-01-02"]])
    mine = test_context.users == alice
    assert test_context.items[mine].tolist() == catalog.rows(pd.Series(["i2", "i3", "i4"])).tolist()
    np.testing.assert_allclose(test_context.days[mine][-1], day["2020-01-04"])
    test_items = set(zip(split.test.users.tolist(), split.test.candidates[:, 0].tolist(), strict=True))
    known = set(zip(test_context.users.tolist(), test_context.items.tolist(), strict=True))
    assert not test_items & known
