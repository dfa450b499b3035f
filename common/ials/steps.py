"""iALS's half-steps: the user step a market solves, the item statistics it sends, the item step the server solves.

Every step is exact (the normal equations of :mod:`common.ials.core`'s loss, solved by the
batched kernels of :mod:`common.ials.kernels`); a market and the server run the same functions.
"""

from collections.abc import Iterator, Sequence

import numpy as np

from common.ials.core import (
    IALSConfig,
    ItemFactors,
    ItemStatistics,
    MarketInteractions,
    item_regularization,
    row_positions,
    user_regularization,
)
from common.ials.kernels import _factor_segments, _group, _solve_segments

# Interactions per block of the user step and of a market's item statistics: each block holds
# one float64 row of d (+1) values per interaction, 0.5 GB at d = 128, whatever the market's size.
BLOCK_INTERACTIONS = 1 << 19


def solve_users(
    market: MarketInteractions, items: ItemFactors, item_gram: np.ndarray, item_rows: int, config: IALSConfig
) -> np.ndarray:
    """A market's user step: every user's exact factor given the item factors.

    Parameters
    ----------
    market : MarketInteractions
        The market's training interactions.
    items : ItemFactors
        Factors of (at least) the items the market's users interacted with.
    item_gram : np.ndarray
        ``(d, d)`` ``YᵀY`` over the whole item table, as the server sends it.
    item_rows : int
        Rows of the whole item table that hold a factor (``ItemFactors.held_rows`` of the
        server's table, as it sends it): |I| of the frequency-scaled regularisation.
    config : IALSConfig
        Hyper-parameters.

    Returns
    -------
    np.ndarray
        ``(num_users, d)`` user factors; zero for a user without interactions.
    """
    weights = market.weights(config)
    confidence = 1.0 + config.alpha * weights
    root = np.sqrt(config.alpha * weights)
    order, users, lengths = _group(market.users)
    regularization = user_regularization(lengths, item_rows, config)
    gram = np.asarray(item_gram, dtype=np.float64)
    eigenbasis = np.linalg.eigh(gram)
    # The item table in the Gram's eigenbasis once, with a zero row last for items without a
    # factor: the solver's rows are then looked up already rotated, not rotated per interaction.
    table = np.vstack([items.factors @ eigenbasis[1], np.zeros((1, items.dim))])
    index = row_positions(items.rows, market.items)
    factors = np.zeros((market.num_users, items.dim))
    # Users in blocks of at most BLOCK_INTERACTIONS interactions: one row of d floats per
    # interaction, so a market of 10^7 interactions never holds 10^7 × d of them at once.
    for first, last, start, stop in _segment_blocks(lengths):
        block = order[start:stop]
        rows = table[index[block]]
        rows *= root[block, None]
        factors[users[first:last]] = _solve_segments(
            gram,
            rows,
            confidence[block] / root[block],
            lengths[first:last],
            regularization[first:last],
            eigenbasis=eigenbasis,
        )
    return factors


def _segment_blocks(lengths: np.ndarray, limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """Consecutive segments in blocks of at most ``limit`` rows (a longer segment alone).

    Returns ``(first, last, start, stop)`` per block: segments ``[first, last)``, rows ``[start, stop)``.
    """
    limit = BLOCK_INTERACTIONS if limit is None else limit
    ends = np.cumsum(lengths)
    blocks, first, start = [], 0, 0
    while first < len(lengths):
        last = max(first + 1, int(np.searchsorted(ends, start + limit, side="right")))
        stop = int(ends[last - 1])
        blocks.append((first, last, start, stop))
        first, start = last, stop
    return blocks


def fold_in(
    history: np.ndarray,
    items: ItemFactors,
    item_gram: np.ndarray,
    item_rows: int,
    config: IALSConfig,
    ratings: np.ndarray | None = None,
) -> np.ndarray:
    """The factor of a user known only by a history of catalog rows (serving unknown users).

    The same solve as :func:`solve_users`; items without a factor count as zero vectors, and
    an empty history gives the zero factor (every item scores 0).
    """
    history = np.asarray(history, dtype=np.int64)
    market = MarketInteractions(np.zeros(len(history), dtype=np.int64), history, 1, ratings)
    return solve_users(market, items, item_gram, item_rows, config)[0]


# --- a market's item statistics ----------------------------------------------------------------


def market_item_statistics(market: MarketInteractions, user_factors: np.ndarray, config: IALSConfig) -> ItemStatistics:
    """What a market sends for the item step: per touched item, the factor of ``S_i^m``.

    Parameters
    ----------
    market : MarketInteractions
        The market's training interactions.
    user_factors : np.ndarray
        ``(num_users, d)`` the market's user factors from :func:`solve_users`.
    config : IALSConfig
        Hyper-parameters (α and the confidence form).

    Returns
    -------
    ItemStatistics
        Item-indexed sums over the market's users, and the market's augmented Gram.
    """
    items, counts, ranks, blocks = statistics_blocks(market, user_factors, config)
    pieces = [rows for _, _, rows in blocks]
    stacked = np.concatenate(pieces) if pieces else np.zeros((0, np.shape(user_factors)[1] + 1))
    return ItemStatistics(items, counts, ranks, stacked, _augmented_gram(user_factors))


def statistics_blocks(
    market: MarketInteractions, user_factors: np.ndarray, config: IALSConfig, block: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Iterator[tuple[int, int, np.ndarray]]]:
    """:func:`market_item_statistics` one block at a time, items in blocks of at most ``block`` buyer rows.

    Returns the market's touched items, their buyer counts, their ranks and an iterator of
    ``(first, last, rows)``: the stacked factor rows of items ``[first, last)``. ``ranks[first:last]``
    holds those items' ranks once their block is yielded.
    """
    weights = market.weights(config)
    root = np.sqrt(config.alpha * weights)
    order, items, counts = _group(market.items)
    factors = np.asarray(user_factors, dtype=np.float64)
    ranks = np.zeros(len(items), dtype=np.int64)

    def blocks() -> Iterator[tuple[int, int, np.ndarray]]:
        for first, last, start, stop in _segment_blocks(counts, block):
            rows = order[start:stop]
            z = _z_rows(factors, market.users[rows], weights[rows], root[rows], config)
            ranks[first:last], piece = _factor_segments(z, counts[first:last])
            del z
            yield first, last, piece

    return items, counts, ranks, blocks()


def _buyer_rows(
    market: MarketInteractions, user_factors: np.ndarray, config: IALSConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The touched items, their buyer counts and one row ``z_u = [√(c−1)·x_u, c/√(c−1)]`` per
    interaction, grouped by item (all at once: for the private and reference paths)."""
    weights = market.weights(config)
    order, items, counts = _group(market.items)
    factors = np.asarray(user_factors, dtype=np.float64)
    return (
        items,
        counts,
        _z_rows(factors, market.users[order], weights[order], np.sqrt(config.alpha * weights[order]), config),
    )


def _z_rows(
    factors: np.ndarray, users: np.ndarray, weights: np.ndarray, root: np.ndarray, config: IALSConfig
) -> np.ndarray:
    """``z = [√(c−1)·x_u, c/√(c−1)]`` for interactions of ``users`` (rows of ``factors``), weights and ``√(α·w)``.

    Written into one array (no stacked copies): at 2^19 rows a block is 0.5 GB.
    """
    dim = factors.shape[1]
    rows = np.empty((len(users), dim + 1))
    np.multiply(factors[users], root[:, None], out=rows[:, :dim])
    rows[:, dim] = (1.0 + config.alpha * weights) / root
    return rows


def _augmented_gram(user_factors: np.ndarray) -> np.ndarray:
    """``Σ_u [x_u, 1][x_u, 1]ᵀ`` over users with a factor: ``XᵀX``, ``Σ_u x_u`` and their count."""
    factors = np.asarray(user_factors, dtype=np.float64)
    factors = factors[np.any(factors != 0.0, axis=1)]  # a user without interactions has none
    with_one = np.hstack([factors, np.ones((len(factors), 1))])
    return with_one.T @ with_one


def solve_items_toward(
    market: MarketInteractions, user_factors: np.ndarray, prior: ItemFactors, prior_weight: float, config: IALSConfig
) -> ItemFactors:
    """One market's exact item step over ``prior.rows``, pulled toward ``prior`` with weight μ ≥ 0.

    ``(XᵀX + A_i + (λ_i + μ)I) y_i = b_i + μ y⁰_i`` with ``A_i = Σ_{u∈U_i}(c_ui−1)x_u x_uᵀ``,
    ``b_i = Σ_{u∈U_i} c_ui x_u`` and ``λ_i`` from the market's users alone (its interactions must
    lie in ``prior.rows``); rows no user bought shrink toward ``y⁰_i``. The private transfer's
    local refit (:mod:`common.ials.transfer`); μ = 0 is the plain local iALS item step.
    """
    if prior_weight < 0:
        raise ValueError(f"The prior's weight must be non-negative, got {prior_weight}.")
    dim = prior.dim
    items, counts, rows = _buyer_rows(market, user_factors, config)
    if len(items) and not np.isin(items, prior.rows).all():
        raise ValueError("The market has interactions on items outside the rows to solve.")
    lengths = np.zeros(len(prior.rows), dtype=np.int64)
    lengths[np.searchsorted(prior.rows, items)] = counts
    gram = _augmented_gram(user_factors)
    regularization = item_regularization(lengths, int(round(gram[dim, dim])), config) + prior_weight
    factors = _solve_segments(
        gram[:dim, :dim], rows[:, :dim], rows[:, dim], lengths, regularization, prior=prior_weight * prior.factors
    )
    return ItemFactors(prior.rows, factors)


# --- the server's item step ----------------------------------------------------------------------


def summed_gram(statistics: Sequence[ItemStatistics]) -> tuple[int, np.ndarray]:
    """The markets' common dimension d and their augmented user Grams summed; ValueError if none or d differs.

    Takes anything with ``dim`` and ``gram`` (also :class:`common.ials.packed.PackedStatistics`).
    """
    if not statistics:
        raise ValueError("The item step needs the statistics of at least one market.")
    dim = statistics[0].dim
    if any(part.dim != dim for part in statistics):
        raise ValueError(f"Markets sent statistics of different dimensions: {sorted({p.dim for p in statistics})}.")
    return dim, sum(part.gram for part in statistics)


def solve_items(statistics: Sequence[ItemStatistics], config: IALSConfig) -> ItemFactors:
    """The server's item step: sum the markets' statistics and solve each touched item exactly.

    ``(Σ_m XᵀX_m + Σ_m A_i^m + λ_i I) y_i = Σ_m b_i^m``, with the per-item sums formed from
    the stacked factors. Items no market touched are not returned: their factor is zero.

    Parameters
    ----------
    statistics : Sequence[ItemStatistics]
        One per market (any order; markets without interactions may be left out).
    config : IALSConfig
        Hyper-parameters (λ, ν, α).

    Returns
    -------
    ItemFactors
        Factors of every item some market touched.
    """
    dim, gram = summed_gram(statistics)
    row_items = np.concatenate([np.repeat(part.items, part.ranks) for part in statistics])
    rows = np.concatenate([part.rows for part in statistics])
    order, items, lengths = _group(row_items)
    buyers = np.zeros(len(items))
    for part in statistics:
        buyers[np.searchsorted(items, part.items)] += part.counts
    rows = rows[order]
    regularization = item_regularization(buyers, int(round(gram[dim, dim])), config)
    factors = _solve_segments(gram[:dim, :dim], rows[:, :dim], rows[:, dim], lengths, regularization)
    return ItemFactors(items, factors)


def score_candidates(
    user_factors: np.ndarray, items: ItemFactors, users: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """``x_u · y_i`` for each evaluated user's candidate rows: ``(n, candidates)``."""
    return np.einsum("nd,ncd->nc", user_factors[users], items.lookup(candidates))
