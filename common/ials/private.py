"""fedals' minimum-buyers rule: which item statistics may leave a market, and the market-private item step.

A market's statistics of item ``i`` are ``S_i = Σ_{u∈U_i} z_u z_uᵀ`` over its buyers
(:mod:`common.ials`). Over one buyer that is the buyer's factor; over two (binary confidence)
both factors follow from ``A`` and ``b`` in closed form; over ``k ≤ d`` buyers the factor
``R_i`` spans exactly the buyers' vectors, so intersecting two items' row spaces, or
subtracting a nested item's statistics, isolates one user (docs/privacy.md, "Reconstruction").
The rule: an item's statistics, and its count, leave the market only when the market has at
least ``min_buyers`` buyers of it (:func:`shared_items`). The default
:data:`DEFAULT_MIN_BUYERS` is fixed here; a run config may raise it, a region's node config
(``als-min-buyers``) may set it to any value from 1 up, and nothing else lowers it
(:func:`min_buyers`).

The items below the threshold stay in the market. It solves their item step itself
(:func:`solve_private_items`), exactly as the server would from its statistics alone: against the
federation's user Gram ``Σ_m X_mᵀX_m`` (the server sends it back with the next round's
factors) and its own ``A_i``, ``b_i``. The private factors are used in the market's user step and
its served model and are never sent. An item the server holds a factor of (another market sent
its statistics) keeps the server's factor.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from common.config import parse_value
from common.ials.core import IALSConfig, ItemFactors, MarketInteractions, item_regularization
from common.ials.kernels import _solve_segments
from common.ials.steps import _buyer_rows

DEFAULT_MIN_BUYERS = 20  # buyers of an item in a market before its statistics leave the market
MIN_BUYERS_KEY = "als-min-buyers"  # node config: the region's own threshold; run config: may only raise


def min_buyers(run_config: Mapping[str, Any], node_config: Mapping[str, Any], market: str) -> int:
    """The minimum buyers this market applies.

    The region's node config sets its own threshold (any whole number from 1: 1 sends every
    item, the rule off); without it the threshold is :data:`DEFAULT_MIN_BUYERS`. The run config
    (written by whoever submits the run) may raise either, never lower it: the larger applies.

    Raises
    ------
    ValueError
        In one line naming the key, if a value is not a whole number of at least 1.
    """
    minimum = DEFAULT_MIN_BUYERS
    if MIN_BUYERS_KEY in node_config:
        minimum = _whole(node_config[MIN_BUYERS_KEY], f"Market '{market}': the node config's {MIN_BUYERS_KEY}")
    if MIN_BUYERS_KEY in run_config:
        minimum = max(minimum, _whole(run_config[MIN_BUYERS_KEY], f"The run config's {MIN_BUYERS_KEY}"))
    return minimum


def _whole(value: Any, where: str) -> int:
    """``value`` as a whole number of at least 1 (:func:`common.config.parse_value`), or a ValueError from ``where``."""
    try:
        number = parse_value(MIN_BUYERS_KEY, int, value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{where} must be a whole number of at least 1, got {value!r}.")
    return number


def shared_items(market: MarketInteractions, minimum: int) -> np.ndarray:
    """The sorted catalog rows the market has at least ``minimum`` buyers of: the rows whose statistics it may send."""
    rows, counts = np.unique(market.items, return_counts=True)
    return rows[counts >= minimum]


def restricted(market: MarketInteractions, rows: np.ndarray, keep: bool = True) -> MarketInteractions:
    """The market's interactions on ``rows`` (``keep``) or off them (not ``keep``); the same users."""
    inside = np.isin(market.items, rows)
    mask = inside if keep else ~inside
    ratings = None if market.ratings is None else market.ratings[mask]
    return MarketInteractions(market.users[mask], market.items[mask], market.num_users, ratings)


def solve_private_items(
    market: MarketInteractions, user_factors: np.ndarray, user_gram: np.ndarray, config: IALSConfig
) -> ItemFactors:
    """The item step of every item ``market`` touches, solved in the market: its own sums, the federation's Gram.

    ``(XᵀX + A_i + λ_i I) y_i = b_i`` with ``XᵀX`` and ``|U|`` from ``user_gram`` (the
    augmented Gram summed over all markets, as the server solves with) and ``A_i``, ``b_i``,
    ``|U_i|`` from the market's own buyers: the server's solution of an item no other market
    sends, without the item's statistics leaving the market.

    Parameters
    ----------
    market : MarketInteractions
        The interactions on the items to solve (:func:`restricted`).
    user_factors : np.ndarray
        ``(num_users, d)`` the market's user factors of the round the Gram is of.
    user_gram : np.ndarray
        ``(d + 1, d + 1)`` ``Σ_u [x_u, 1][x_u, 1]ᵀ`` over the federation's users.
    config : IALSConfig
        Hyper-parameters.
    """
    dim = user_factors.shape[1]
    items, counts, rows = _buyer_rows(market, user_factors, config)
    if not len(items):
        return ItemFactors(np.zeros(0, dtype=np.int64), np.zeros((0, dim)))
    gram = np.asarray(user_gram, dtype=np.float64)
    regularization = item_regularization(counts, int(round(gram[dim, dim])), config)
    factors = _solve_segments(gram[:dim, :dim], rows[:, :dim], rows[:, dim], counts, regularization)
    return ItemFactors(items, factors)


def merged(received: ItemFactors, private: ItemFactors) -> tuple[ItemFactors, np.ndarray]:
    """The market's item factors: ``received``, with ``private`` rows where the server holds none (a zero row).

    Returns the merged factors and the private rows used, whose ``y yᵀ`` the market adds to the
    server's Gram (the server's table is zero there, so they are missing from its Gram).
    """
    held = np.any(received.lookup(private.rows) != 0.0, axis=1) if len(private.rows) else np.zeros(0, dtype=bool)
    used = ItemFactors(private.rows[~held], private.factors[~held])
    if not len(used.rows):
        return received, used
    rows = np.union1d(received.rows, used.rows)
    factors = received.lookup(rows)
    factors[np.searchsorted(rows, used.rows)] = used.factors
    return ItemFactors(rows, factors), used
