"""Statistics packed block by block in the market and solved block by block on the server (common.ials.packed)."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ials.core import IALSConfig, ItemFactors, MarketInteractions, initial_item_factors
from common.ials.packed import PackedStatistics, npy_view, pack_market_statistics, solve_items_packed
from common.ials.steps import market_item_statistics, solve_items, solve_users
from common.ials.wire import pack_statistics, unpack_statistics
from tests.common.ials.test_ials import NUM_ITEMS, three_markets

CONFIG = IALSConfig(factors=4, regularization=0.5, alpha=3.0, nu=0.5, confidence="rating")


def solved_markets(config: IALSConfig = CONFIG) -> list[tuple]:
    """The three test markets with their users solved against a seeded item table."""
    items = ItemFactors(np.arange(NUM_ITEMS), initial_item_factors(np.arange(NUM_ITEMS), config.factors, 0, 0.3))
    gram = items.gram()
    return [(market, solve_users(market, items, gram, NUM_ITEMS, config)) for market in three_markets()]


@pytest.mark.parametrize("wire", ["float32", "float16"])
@pytest.mark.parametrize("block", [1, 3, 7, None])
def test_packing_in_blocks_gives_the_arrays_of_packing_at_once(wire, block):
    # Prepare
    for market, users in solved_markets():
        whole = pack_statistics(market_item_statistics(market, users, CONFIG), wire)

        # Execute
        packed = pack_market_statistics(market, users, CONFIG, wire, block=block)

        # Assert: the same arrays, value for value.
        assert set(packed) == set(whole)
        for name in whole:
            assert packed[name].dtype == whole[name].dtype, name
            np.testing.assert_array_equal(packed[name], whole[name], err_msg=name)


def test_packing_refuses_a_value_the_wire_type_cannot_hold():
    market, users = solved_markets()[0]
    with pytest.raises(ValueError, match="does not fit float16"):
        pack_market_statistics(market, users * 1e4, CONFIG, "float16")


@settings(max_examples=25, deadline=None)
@given(block_rows=st.integers(1, 40), wire=st.sampled_from(["float32", "float16"]))
def test_the_item_step_in_blocks_equals_the_item_step_at_once(block_rows, wire):
    # Prepare: three markets' payloads, as the server receives them.
    payloads = [pack_market_statistics(market, users, CONFIG, wire) for market, users in solved_markets()]
    expected = solve_items([unpack_statistics(payload) for payload in payloads], CONFIG)

    # Execute: items in blocks of at most block_rows factor rows, the factors left packed.
    solved = solve_items_packed([PackedStatistics.from_payload(payload) for payload in payloads], CONFIG, block_rows)

    # Assert: the same rows and factors.
    np.testing.assert_array_equal(solved.rows, expected.rows)
    np.testing.assert_allclose(solved.factors, expected.factors, rtol=0, atol=1e-12)


def test_a_payload_whose_factor_disagrees_with_its_ranks_is_refused():
    market, users = solved_markets()[0]
    payload = pack_market_statistics(market, users, CONFIG)
    payload["factor"] = payload["factor"][:-1]
    with pytest.raises(ValueError, match="its ranks need another length"):
        PackedStatistics.from_payload(payload)


def test_npy_view_reads_the_bytes_without_a_copy():
    # Prepare: an array serialised as Flower's Array carries it.
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()

    # Execute
    view = npy_view(data)

    # Assert: equal values, a read-only view of the bytes themselves.
    np.testing.assert_array_equal(view, array)
    assert view.dtype == array.dtype and not view.flags.writeable
    assert view.base is not None and not view.flags.owndata


def test_npy_view_reads_what_numpy_load_reads_in_fortran_order_and_refuses_short_bytes():
    # Prepare: a Fortran-ordered array (numpy.load reads it; a reply may carry one), and bytes cut short.
    array = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()

    # Execute / Assert: the same values as numpy.load; short bytes fail as numpy.load fails.
    np.testing.assert_array_equal(npy_view(data), np.load(io.BytesIO(data)))
    with pytest.raises(ValueError):
        npy_view(data[:-4])


def test_npy_view_refuses_what_is_not_an_array():
    with pytest.raises(ValueError):
        npy_view(b"not an array at all")


def test_a_market_without_interactions_packs_as_at_once():
    # Prepare: a market whose two users bought nothing.

    market = MarketInteractions(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 2, ratings=np.zeros(0))
    users = np.zeros((2, CONFIG.factors))

    # Execute
    packed = pack_market_statistics(market, users, CONFIG, "float16")

    # Assert
    whole = pack_statistics(market_item_statistics(market, users, CONFIG), "float16")
    for name in whole:
        assert packed[name].dtype == whole[name].dtype and packed[name].shape == whole[name].shape, name
