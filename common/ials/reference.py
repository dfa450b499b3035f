"""The two references that must be equal: iALS on pooled data and fedals' protocol in one process.

:func:`pooled_ials` alternates the exact half-steps of :mod:`common.ials.steps` over every
market's interactions at once; :func:`federated_ials` runs fedals' protocol, every message
through the wire format of :mod:`common.ials.wire` (a market sends item statistics, the server
solves the item step and sends back item factors and their Gram). Tests hold them equal, which
is the proof that federating loses nothing but the wire's precision.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.ials.core import (
    IALSConfig,
    ItemFactors,
    ItemStatistics,
    MarketInteractions,
    initial_item_factors_table,
    initial_item_gram,
)
from common.ials.packed import PackedStatistics, pack_market_statistics, solve_items_packed
from common.ials.steps import _augmented_gram, _buyer_rows, solve_items, solve_users
from common.ials.wire import pack_item_factors, payload_bytes, unpack_item_factors

# --- a whole pooled run -----------------------------


# Called after each iteration with (iteration, user factors per market, item factors).
Callback = Callable[[int, list[np.ndarray], ItemFactors], None]


@dataclass
class IALSResult:
    """Factors after a run: users of each market (solved against the final items) and items."""

    user_factors: list[np.ndarray]
    item_factors: ItemFactors
    upload_bytes: list[list[int]] = field(default_factory=list)  # per item step, per market
    download_bytes: list[list[int]] = field(default_factory=list)  # per user step, per market


def pooled_ials(
    markets: Sequence[MarketInteractions], num_items: int, config: IALSConfig, callback: Callback | None = None
) -> IALSResult:
    """iALS on all markets' interactions in one place: the reference fedals must equal.

    The same iterations as :func:`common.ials_wire.federated_ials` without the per-item
    factorisation and the wire: the item step stacks one row ``z_u`` per interaction.

    Parameters
    ----------
    markets : Sequence[MarketInteractions]
        Each market's interactions; users of different markets are different users.
    num_items : int
        Rows of the item table (every catalog row starts with a seeded factor).
    config : IALSConfig
        Hyper-parameters.
    callback : callable, optional
        ``callback(t, user_factors, item_factors)`` after item step ``t`` and the user step on it.

    Returns
    -------
    IALSResult
        User factors per market and the item factors.
    """
    items = initial_item_factors_table(np.arange(num_items), config)
    gram = items.gram()
    for step in range(config.iterations + 1):
        users = [solve_users(market, items, gram, items.held_rows(), config) for market in markets]
        if step and callback is not None:
            callback(step, users, items)
        if step == config.iterations:
            return IALSResult(users, items)
        statistics = [_interaction_statistics(m, x, config) for m, x in zip(markets, users, strict=True)]
        items = solve_items(statistics, config)
        gram = items.gram()
    raise AssertionError("unreachable")


def _interaction_statistics(market: MarketInteractions, user_factors: np.ndarray, config: IALSConfig) -> ItemStatistics:
    """Item statistics with one row per interaction (uncompressed): the pooled path."""
    items, counts, rows = _buyer_rows(market, user_factors, config)
    return ItemStatistics(items, counts, counts, rows, _augmented_gram(user_factors))


def federated_ials(
    markets: Sequence[MarketInteractions],
    num_items: int,
    config: IALSConfig,
    callback: Callback | None = None,
    wire_dtype: str = "float32",
) -> IALSResult:
    """The fedals protocol in one process, every message through its wire format.

    Round t: the server sends each market its touched rows' factors and the Gram in float32
    (round 1: the seeded initial rows and the Gram of the whole initial table); the market
    solves its users and sends :func:`pack_statistics` of its item statistics (factors in
    ``wire_dtype``); the server unpacks, sums and solves the items. A last download lets the
    markets solve users on the final items.

    Returns
    -------
    IALSResult
        As :func:`pooled_ials`, plus the bytes each market uploaded and downloaded per round.
    """
    touched = [np.unique(market.items) for market in markets]
    items = initial_item_factors_table(np.arange(0), config)
    gram = initial_item_gram(num_items, config.factors, config.seed, config.init_std)
    result = IALSResult([], items)
    for step in range(config.iterations + 1):
        held = num_items if step == 0 else items.held_rows()  # every row holds its seeded factor at first
        downloads = [
            pack_item_factors(initial_item_factors_table(rows, config) if step == 0 else items.subset(rows), gram, held)
            for rows in touched
        ]
        result.download_bytes.append([payload_bytes(payload) for payload in downloads])
        users = []
        for market, payload in zip(markets, downloads, strict=True):
            market_items, market_gram, item_rows = unpack_item_factors(payload)
            users.append(solve_users(market, market_items, market_gram, item_rows, config))
        if step and callback is not None:
            callback(step, users, items)
        if step == config.iterations:
            result.user_factors = users
            result.item_factors = items
            return result
        # What the deployed market and server run: statistics packed block by block, the item
        # step in blocks from the packed arrays.
        uploads = [
            pack_market_statistics(market, x, config, wire_dtype)
            for market, x in zip(markets, users, strict=True)
            if len(market.items)
        ]
        result.upload_bytes.append([payload_bytes(payload) for payload in uploads])
        items = solve_items_packed([PackedStatistics.from_payload(payload) for payload in uploads], config)
        gram = items.gram()
    raise AssertionError("unreachable")
