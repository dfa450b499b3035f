"""iALS maths of fedals: exact solves, federated == pooled, the wire format and what it may carry."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ials import steps
from common.ials.core import IALSConfig, ItemFactors, MarketInteractions, initial_item_factors, initial_item_gram
from common.ials.kernels import _factor_segments
from common.ials.reference import federated_ials, pooled_ials
from common.ials.steps import fold_in, market_item_statistics, solve_items, solve_users
from common.ials.wire import check_item_side, pack_statistics, packed_length, unpack_statistics

NUM_ITEMS = 30


def three_markets(seed: int = 1) -> list[MarketInteractions]:
    """Three markets over 30 catalog rows: items 10-17 shared by the first two, 1-2 and 20-22 by all
    three, 18-19 and 23-25 by one market only, 28-29 by none; some users buy more than d items,
    and the second market's last user bought nothing."""
    rng = np.random.default_rng(seed)
    markets = []
    shapes = ((12, 0, np.arange(0, 18)), (9, 1, np.arange(10, 26)), (5, 0, np.array([1, 2, 20, 21, 22, 27])))
    for buyers, idle, items in shapes:
        pairs = {(user, int(rng.choice(items))) for user in range(buyers) for _ in range(rng.integers(1, 12))}
        users, rows = map(np.array, zip(*sorted(pairs), strict=True))
        ratings = rng.integers(1, 6, len(users)).astype(float)
        markets.append(MarketInteractions(users, rows, buyers + idle, ratings=ratings))
    return markets


def naive_ials(
    markets: list[MarketInteractions], num_items: int, config: IALSConfig
) -> tuple[list[np.ndarray], np.ndarray]:
    """Dense textbook iALS: every user and item solved with its full d×d system (the loss of common.ials)."""
    offsets = np.cumsum([0] + [market.num_users for market in markets])
    confidence = np.ones((offsets[-1], num_items))
    preference = np.zeros((offsets[-1], num_items))
    for market, offset in zip(markets, offsets, strict=False):
        confidence[market.users + offset, market.items] = 1 + config.alpha * market.weights(config)
        preference[market.users + offset, market.items] = 1.0
    item_factors = initial_item_factors(np.arange(num_items), config.factors, config.seed, config.init_std)
    eye = np.eye(config.factors)
    buyers = np.count_nonzero(preference.sum(axis=1))  # |U|: users with an interaction
    for step in range(config.iterations + 1):
        users = np.zeros((offsets[-1], config.factors))
        held = np.count_nonzero(item_factors.any(axis=1))  # |I|: rows with a factor (all of them at first)
        for u in range(offsets[-1]):
            reg = config.regularization * (preference[u].sum() + held / config.alpha) ** config.nu
            weighted = item_factors.T * confidence[u]
            users[u] = np.linalg.solve(weighted @ item_factors + reg * eye, weighted @ preference[u])
        if step == config.iterations:
            return [users[o : o + m.num_users] for m, o in zip(markets, offsets, strict=False)], item_factors
        item_factors = np.zeros_like(item_factors)
        for i in np.flatnonzero(preference.sum(axis=0)):
            reg = config.regularization * (preference[:, i].sum() + buyers / config.alpha) ** config.nu
            weighted = users.T * confidence[:, i]
            item_factors[i] = np.linalg.solve(weighted @ users + reg * eye, weighted @ preference[:, i])
    raise AssertionError("unreachable")


CONFIGS = [
    IALSConfig(factors=4, regularization=0.1, alpha=3.0, nu=0.0, iterations=5, init_std=0.3),
    IALSConfig(factors=6, regularization=0.02, alpha=5.0, nu=1.0, iterations=6, confidence="log", init_std=0.3, seed=3),
    IALSConfig(factors=8, regularization=0.5, alpha=2.0, nu=0.5, iterations=4, confidence="rating", init_std=0.3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "frequency-scaled-log", "rating"])
def test_pooled_ials_equals_textbook_dense_ials(config):
    # Prepare
    markets = three_markets()

    # Execute
    pooled = pooled_ials(markets, NUM_ITEMS, config)
    users, items = naive_ials(markets, NUM_ITEMS, config)

    # Assert: the eigenbasis / push-through solves change nothing but rounding.
    np.testing.assert_allclose(pooled.item_factors.to_dense(NUM_ITEMS), items, atol=1e-10)
    for ours, theirs in zip(pooled.user_factors, users, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "frequency-scaled-log", "rating"])
def test_federated_factors_equal_pooled_ials_through_the_wire(config):
    # Prepare
    markets = three_markets()

    # Execute: every message through its float32 wire format.
    federated = federated_ials(markets, NUM_ITEMS, config)
    pooled = pooled_ials(markets, NUM_ITEMS, config)

    # Assert
    np.testing.assert_allclose(
        federated.item_factors.to_dense(NUM_ITEMS), pooled.item_factors.to_dense(NUM_ITEMS), atol=1e-5
    )
    for ours, theirs in zip(federated.user_factors, pooled.user_factors, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert np.abs(pooled.item_factors.to_dense(NUM_ITEMS)).max() > 0.1  # not trivially all zero


def test_items_nobody_touched_get_zero_factors():
    # Prepare
    markets = three_markets()
    config = CONFIGS[0]

    # Execute
    items = federated_ials(markets, NUM_ITEMS, config).item_factors

    # Assert: rows 28 and 29 appear in no market, row 27 only in the third.
    assert 27 in items.rows and 28 not in items.rows and 29 not in items.rows
    np.testing.assert_array_equal(items.lookup(np.array([28, 29])), np.zeros((2, config.factors)))


def test_one_item_solve_by_hand():
    # Prepare: d = 2, x_1 = (1, 0), x_2 = (0, 2); item 0 bought by both, item 1 by user 1 only;
    # α = 1 (c = 2), λ = 1, ν = 0. Item 0: XᵀX + Σ(c−1)xxᵀ + λI = diag(3, 9), b = Σ c x = (2, 4).
    # Item 1: diag(1, 4) + diag(1, 0) + I = diag(3, 5), b = (2, 0).
    config = IALSConfig(factors=2, regularization=1.0, alpha=1.0)
    users = np.array([[1.0, 0.0], [0.0, 2.0]])
    together = MarketInteractions(np.array([0, 1, 0]), np.array([0, 0, 1]), 2)
    first_alone = MarketInteractions(np.array([0, 0]), np.array([0, 1]), 1)
    second_alone = MarketInteractions(np.array([0]), np.array([0]), 1)

    # Execute: the two users in one market, and each in a market of its own.
    one = solve_items([market_item_statistics(together, users, config)], config)
    two = solve_items(
        [
            market_item_statistics(first_alone, users[:1], config),
            market_item_statistics(second_alone, users[1:], config),
        ],
        config,
    )

    # Assert
    expected = np.array([[2 / 3, 4 / 9], [2 / 3, 0.0]])
    np.testing.assert_array_equal(one.rows, [0, 1])
    np.testing.assert_allclose(one.factors, expected, atol=1e-12)
    np.testing.assert_allclose(two.factors, expected, atol=1e-12)


@pytest.mark.parametrize(("nu", "expected"), [(0.0, 2 / 3), (1.0, 2 / 5)])
def test_one_user_solve_by_hand(nu, expected):
    # Prepare: two items y_0 = (1, 0), y_1 = (0, 1), so YᵀY = I; the user bought item 0 (c = 2).
    # ν = 0: diag(1 + 1 + 1, 1 + 1) x = (2, 0). ν = 1: λ_u = λ(|I_u| + |I|/α) = 1 + 2 = 3.
    config = IALSConfig(factors=2, regularization=1.0, alpha=1.0, nu=nu)
    items = ItemFactors(np.array([0, 1]), np.eye(2))
    market = MarketInteractions(np.array([0]), np.array([0]), 1)

    # Execute
    factor = solve_users(market, items, items.gram(), 2, config)

    # Assert
    np.testing.assert_allclose(factor, [[expected, 0.0]], atol=1e-12)


def test_fold_in_matches_the_user_step_and_handles_empty_and_unknown_histories():
    # Prepare
    config = CONFIGS[1]
    markets = three_markets()
    result = pooled_ials(markets, NUM_ITEMS, config)
    items, gram = result.item_factors, result.item_factors.gram()
    market = markets[0]
    history = market.items[market.users == 3]
    ratings = market.ratings[market.users == 3]

    # Execute
    folded = fold_in(history, items, gram, items.held_rows(), config, ratings)
    empty = fold_in(np.array([], dtype=np.int64), items, gram, items.held_rows(), config, np.array([]))
    unknown = fold_in(np.array([29]), items, gram, items.held_rows(), config, np.array([5.0]))

    # Assert
    np.testing.assert_allclose(folded, result.user_factors[0][3], atol=1e-12)
    np.testing.assert_array_equal(empty, np.zeros(config.factors))
    np.testing.assert_array_equal(unknown, np.zeros(config.factors))


def test_initial_factors_are_seeded_per_row():
    # Prepare
    rows = np.array([3, 17, 1000000])

    # Execute
    subset = initial_item_factors(rows, 8, seed=5)
    table = initial_item_factors(np.arange(20), 8, seed=5)
    other_seed = initial_item_factors(rows, 8, seed=6)

    # Assert: a row's factor depends on (seed, row) alone; the Gram streams the same table.
    np.testing.assert_array_equal(subset[:2], table[[3, 17]])
    assert not np.allclose(subset, other_seed)
    np.testing.assert_allclose(initial_item_gram(20, 8, seed=5, chunk=7), table.T @ table, atol=1e-15)
    large = initial_item_factors(np.arange(20000), 16, seed=0, std=0.01)
    assert abs(large.mean()) < 1e-3 and abs(large.std() - 0.01) < 2e-4


def summed_statistics(
    market: MarketInteractions, users: np.ndarray, config: IALSConfig
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A_i and b_i of each item straight from the definition."""
    weights = market.weights(config)
    out = {}
    for item in np.unique(market.items):
        chosen = market.items == item
        c = 1 + config.alpha * weights[chosen]
        x = users[market.users[chosen]]
        out[int(item)] = ((x.T * (c - 1)) @ x, x.T @ c)
    return out


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 6),
    buyers=st.lists(st.integers(1, 14), min_size=1, max_size=6),
    duplicates=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packing_round_trips_sums_of_rank_below_and_above_d(d, buyers, duplicates, seed):
    # Prepare: item j has buyers[j] buyers (below, at and above d + 1); with duplicates, users
    # share factors, so sums lose rank (a zero pivot: the factor is recomputed from the sum).
    rng = np.random.default_rng(seed)
    num_users = max(buyers)
    users = rng.normal(size=(num_users, d))
    if duplicates and num_users > 1:
        users[1::2] = users[0]
    pairs = [(u, j) for j, k in enumerate(buyers) for u in rng.choice(num_users, size=k, replace=False)]
    market = MarketInteractions(
        np.array([p[0] for p in pairs]),
        np.array([p[1] for p in pairs]) * 7,
        num_users,
        ratings=rng.uniform(1, 5, len(pairs)),
    )
    config = IALSConfig(factors=d, alpha=2.0, confidence="rating")

    # Execute
    statistics = market_item_statistics(market, users, config)
    payload = pack_statistics(statistics)
    unpacked = unpack_statistics(payload)

    # Assert: ranks within min(k, d + 1); RᵀR holds A_i and b_i to float32 precision.
    assert np.all(unpacked.ranks <= np.minimum(unpacked.counts, d + 1))
    assert payload["factor"].dtype == np.float32 and payload["factor"].shape == (packed_length(unpacked.ranks, d),)
    starts = np.concatenate([[0], np.cumsum(unpacked.ranks)])
    for n, (item, (a, b)) in enumerate(summed_statistics(market, users, config).items()):
        assert unpacked.items[n] == item and unpacked.counts[n] == buyers[item // 7]
        rows = unpacked.rows[starts[n] : starts[n + 1]]
        assert np.allclose(np.tril(rows, -1), 0.0)  # upper trapezoidal: nothing below the diagonal sent
        summed = rows.T @ rows
        scale = max(np.abs(a).max(), np.abs(b).max())
        np.testing.assert_allclose(summed[:d, :d], a, atol=1e-6 * scale)
        np.testing.assert_allclose(summed[:d, d], b, atol=1e-6 * scale)
    np.testing.assert_allclose(unpacked.gram[:d, :d], users.T @ users, rtol=1e-6, atol=1e-6)
    assert unpacked.num_users == num_users


def test_a_factor_is_a_function_of_the_sum_alone():
    # Prepare: the same per-item sums from different buyers (an orthogonal mix of their rows).
    rng = np.random.default_rng(0)
    d = 3
    config = IALSConfig(factors=d, alpha=1.0)
    users = rng.normal(size=(2, d))
    market = MarketInteractions(np.array([0, 1]), np.array([4, 4]), 2)
    reference = market_item_statistics(market, users, config)
    # Rows z_u = [√(c−1) x_u, c/√(c−1)] = [x_u, 2]; a rotation of the two rows keeps Σ z zᵀ.
    z = np.hstack([users, np.full((2, 1), 2.0)])
    rotation = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])
    mixed = rotation @ z

    # Execute: factor the rotated rows (the same S_i from different buyers).
    ranks, rows = _factor_segments(mixed, np.array([2]))

    # Assert: the same factor, so the message reveals nothing the sum does not.
    np.testing.assert_array_equal(ranks, reference.ranks)
    np.testing.assert_allclose(rows, reference.rows, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_a_rank_deficient_sum_over_many_buyers_gets_the_same_factor_in_any_buyer_order(seed):
    # Prepare: 40 buyers of one item sharing 8 distinct factors (d = 8): S has rank 8 < d + 1,
    # and the block is taller than wide, so it takes the Gram's Cholesky path first.
    rng = np.random.default_rng(seed)
    d = 8
    config = IALSConfig(factors=d, alpha=1.0)
    users = rng.normal(size=(8, d))[rng.integers(0, 8, 40)]
    market = MarketInteractions(np.arange(40), np.zeros(40, dtype=np.int64), 40)
    reference = market_item_statistics(market, users, config)

    # Execute: the same buyers in another order.
    shuffled = market_item_statistics(market, users[rng.permutation(40)], config)

    # Assert: the canonical factor of the sum: rank 8, the same rows whatever the order.
    assert reference.ranks.tolist() == shuffled.ranks.tolist() == [8]
    np.testing.assert_allclose(shuffled.rows, reference.rows, rtol=0, atol=1e-10)


def test_check_item_side_accepts_the_statistics_and_names_a_user_indexed_array():
    # Prepare
    config = CONFIGS[0]
    market = three_markets()[0]
    users = np.random.default_rng(0).normal(size=(market.num_users, config.factors))
    payload = pack_statistics(market_item_statistics(market, users, config))
    touched = np.unique(market.items)

    # Execute / Assert: the real payload passes.
    check_item_side(payload, touched, config.factors)

    # Assert: a user axis, a stray factor length, missing items, inflated ranks are refused.
    leaks = {
        "user_factors": {**payload, "user_factors": users.astype(np.float32)},
        "user_ids": {**payload, "user_ids": np.arange(market.num_users)},
        "scalar": {**payload, "scalar": np.float32(3.0)},
    }
    for name, leaky in leaks.items():
        with pytest.raises(ValueError, match=f"'{name}'"):
            check_item_side(leaky, touched, config.factors)
    with pytest.raises(ValueError, match="'factor'"):
        longer = np.zeros(len(payload["factor"]) + 1, np.float32)
        check_item_side({**payload, "factor": longer}, touched, config.factors)
    with pytest.raises(ValueError, match="'items'"):
        check_item_side(payload, touched[:-1], config.factors)
    with pytest.raises(ValueError, match="'ranks'"):
        check_item_side({**payload, "ranks": payload["counts"] + 1}, touched, config.factors)


def test_payload_grows_with_touched_items_not_the_catalog():
    # Prepare: one market touching 3 rows of catalogs of 30 and 3 million rows.
    config = IALSConfig(factors=4)
    market = MarketInteractions(np.array([0, 1, 1, 2]), np.array([5, 5, 9, 2_999_999]), 3)
    users = np.random.default_rng(0).normal(size=(3, 4))

    # Execute
    payload = pack_statistics(market_item_statistics(market, users, config))

    # Assert
    assert {len(payload[key]) for key in ("items", "counts", "ranks")} == {3}
    assert payload["factor"].nbytes == 4 * packed_length(np.array([2, 1, 1]), 4)


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="alpha"):
        IALSConfig(alpha=0.0)
    with pytest.raises(ValueError, match="confidence"):
        IALSConfig(confidence="squared")
    with pytest.raises(ValueError, match="ratings"):
        MarketInteractions(np.array([0]), np.array([0]), 1).weights(IALSConfig(confidence="rating"))


def test_matches_implicit_cholesky_als_when_installed():
    implicit_als = pytest.importorskip("implicit.cpu.als")
    from scipy import sparse

    # Prepare: implicit's confidence is alpha·r, ours 1 + α·w, so binary α_ours = alpha − 1; the
    # same initial item factors (users are solved first, so theirs need none).
    config = IALSConfig(factors=5, regularization=0.3, alpha=4.0, iterations=6, init_std=0.3)
    markets = three_markets()
    offsets = np.cumsum([0] + [m.num_users for m in markets])
    users = np.concatenate([m.users + o for m, o in zip(markets, offsets, strict=False)])
    items = np.concatenate([m.items for m in markets])
    matrix = sparse.csr_matrix((np.ones(len(users)), (users, items)), shape=(offsets[-1], NUM_ITEMS))
    model = implicit_als.AlternatingLeastSquares(
        factors=5, regularization=0.3, alpha=5.0, iterations=6, use_cg=False, dtype=np.float64, num_threads=1
    )
    model.item_factors = initial_item_factors(np.arange(NUM_ITEMS), 5, config.seed, config.init_std)
    model.user_factors = np.zeros((offsets[-1], 5))

    # Execute: implicit ends on an item step; ours solves users once more, so compare items after
    # the same number of item steps.
    model.fit(matrix, show_progress=False)
    ours = pooled_ials(markets, NUM_ITEMS, config)

    # Assert
    np.testing.assert_allclose(ours.item_factors.to_dense(NUM_ITEMS), model.item_factors, atol=1e-8)


def test_a_float16_wire_halves_the_factor_and_stays_close_to_pooled():
    # Prepare
    config = CONFIGS[1]
    markets = three_markets()

    # Execute
    half = federated_ials(markets, NUM_ITEMS, config, wire_dtype="float16")
    single = federated_ials(markets, NUM_ITEMS, config)
    pooled = pooled_ials(markets, NUM_ITEMS, config)

    # Assert: half the factor bytes, factors within float16's ~1e-3 of pooled's scale.
    assert sum(half.upload_bytes[0]) < 0.75 * sum(single.upload_bytes[0])
    expected = pooled.item_factors.to_dense(NUM_ITEMS)
    gap = np.abs(half.item_factors.to_dense(NUM_ITEMS) - expected).max()
    assert gap < 1e-2 * np.abs(expected).max()
    with pytest.raises(ValueError, match="wire dtype"):
        pack_statistics(market_item_statistics(markets[0], pooled.user_factors[0], config), "int8")
    with pytest.raises(ValueError, match="float32"):
        pack_statistics(market_item_statistics(markets[0], 1e5 * pooled.user_factors[0], config), "float16")


def test_segment_blocks_by_hand():
    # Prepare: segments of 3, 5, 2, 9 and 1 rows; blocks of at most 8 rows.
    lengths = np.array([3, 5, 2, 9, 1])

    # Execute
    blocks = steps._segment_blocks(lengths, limit=8)

    # Assert: 3+5 fill a block, 2 alone (2+9 > 8), 9 alone though over the limit, then 1.
    assert blocks == [(0, 2, 0, 8), (2, 3, 8, 10), (3, 4, 10, 19), (4, 5, 19, 20)]


@pytest.mark.parametrize("block", [1, 5, 64])
def test_user_step_and_statistics_in_blocks_equal_one_block(monkeypatch, block):
    # Prepare: a market, its users solved and its statistics computed in one block.
    config = CONFIGS[1]
    market = three_markets()[0]
    items = ItemFactors(np.arange(NUM_ITEMS), initial_item_factors(np.arange(NUM_ITEMS), config.factors, 0, 0.3))
    gram = items.gram()
    whole_users = solve_users(market, items, gram, NUM_ITEMS, config)
    whole = market_item_statistics(market, whole_users, config)

    # Execute: the same in blocks of `block` interactions.
    monkeypatch.setattr(steps, "BLOCK_INTERACTIONS", block)
    users = solve_users(market, items, gram, NUM_ITEMS, config)
    statistics = market_item_statistics(market, users, config)

    # Assert: the same factors and statistics, item by item.
    np.testing.assert_allclose(users, whole_users, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(statistics.items, whole.items)
    np.testing.assert_array_equal(statistics.counts, whole.counts)
    np.testing.assert_array_equal(statistics.ranks, whole.ranks)
    np.testing.assert_allclose(statistics.rows, whole.rows, rtol=0, atol=1e-12)
