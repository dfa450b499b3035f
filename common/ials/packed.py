"""fedals' statistics at a real region's size: packed block by block in the market, solved block by block on the server.

A market of 10^7 interactions has up to one factor row of d + 1 values per interaction
(:func:`common.ials.steps.market_item_statistics`): 10 GB of float64 at d = 128 before the wire
packs them into a few GB of float16, and the server summing 20 such markets would unpack them
all at once. Here neither side ever holds more than one block in float64:

- :func:`pack_market_statistics` computes the statistics of the items in blocks of at most
  :data:`common.ials.steps.BLOCK_INTERACTIONS` buyer rows and packs each block straight into
  the wire type: the same arrays as ``pack_statistics(market_item_statistics(...))``, value for
  value, with the float64 rows of one block alive at a time.
- :class:`PackedStatistics` reads a reply's packed arrays as they came (a view of the
  message's bytes, :func:`npy_view`) and unpacks the rows of a range of its items on demand.
- :func:`solve_items_packed` is :func:`common.ials.steps.solve_items` over items in blocks of at
  most ``block_rows`` factor rows summed over the markets: the same exact solve per item.

Written by hand because the blocks follow fedals' own packing (items sorted, trapezoids
packed row by row), which no library reads.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.ials.core import IALSConfig, ItemFactors, MarketInteractions, item_regularization
from common.ials.kernels import _solve_segments
from common.ials.steps import _augmented_gram, _segment_blocks, statistics_blocks, summed_gram
from common.ials.wire import WIRE_DTYPES, _trapezoid_mask, packed_length, packed_values, read_npy_header


def pack_market_statistics(
    market: MarketInteractions,
    user_factors: np.ndarray,
    config: IALSConfig,
    wire_dtype: str = "float32",
    block: int | None = None,
) -> dict[str, np.ndarray]:
    """``pack_statistics(market_item_statistics(market, user_factors, config), wire_dtype)``, one block at a time.

    Parameters
    ----------
    market, user_factors, config
        As :func:`common.ials.steps.market_item_statistics`.
    wire_dtype : {"float32", "float16"}
        Precision of the packed factors (default float32).
    block : int, optional
        Buyer rows per block (default :data:`common.ials.steps.BLOCK_INTERACTIONS`).

    Returns
    -------
    dict[str, np.ndarray]
        The arrays of :func:`common.ials.wire.pack_statistics`.
    """
    if wire_dtype not in WIRE_DTYPES:  # before any work, and for a market without interactions too
        raise ValueError(f"Unknown wire dtype '{wire_dtype}'; choose one of {WIRE_DTYPES}.")
    items, counts, ranks, blocks = statistics_blocks(market, user_factors, config, block)
    pieces = [packed_values(rows, ranks[first:last], wire_dtype) for first, last, rows in blocks]
    return {
        "items": np.asarray(items, dtype=np.int64),
        "counts": np.asarray(counts).astype(np.int32),
        "ranks": np.asarray(ranks).astype(np.int32),
        "factor": np.concatenate(pieces) if pieces else np.zeros(0, dtype=wire_dtype),
        "gram": _augmented_gram(user_factors).astype(np.float32),
    }


def npy_view(data: bytes) -> np.ndarray:
    """The array of serialised ``.npy`` bytes as a read-only view of them (``numpy.load`` copies).

    Reads ``.npy`` versions 1.0 and 2.0, C or Fortran order, and raises ValueError on anything
    else (version 3.0 included, which ``numpy.load`` reads): the server views only statistics
    whose headers its reply screen has read as 1.0 or 2.0 (:func:`common.ials.wire.npy_header_problem`)
    and decoded once, so a view never fails where the screen passed.
    """
    shape, fortran_order, dtype, offset = read_npy_header(data)
    if dtype.hasobject:
        raise ValueError("Arrays of Python objects are never read.")
    count = int(np.prod(shape, dtype=np.int64))
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return values.reshape(shape[::-1]).T if fortran_order else values.reshape(shape)


@dataclass(frozen=True)
class PackedStatistics:
    """A market's statistics as they travel (:func:`common.ials.wire.pack_statistics`), unpacked a range at a time.

    Parameters
    ----------
    items : np.ndarray
        ``(n,)`` sorted catalog rows.
    counts : np.ndarray
        ``(n,)`` buyers per item.
    ranks : np.ndarray
        ``(n,)`` factor rows per item.
    factor : np.ndarray
        The packed factors in the wire type (float16 or float32), possibly a view of a message.
    gram : np.ndarray
        ``(d + 1, d + 1)`` the market's augmented user Gram.
    """

    items: np.ndarray
    counts: np.ndarray
    ranks: np.ndarray
    factor: np.ndarray
    gram: np.ndarray

    @classmethod
    def from_payload(cls, payload: dict[str, np.ndarray]) -> "PackedStatistics":
        """The statistics of a payload, the factor left in its wire type; ValueError if the sizes disagree."""
        gram = np.asarray(payload["gram"], dtype=np.float64)
        ranks = np.asarray(payload["ranks"], dtype=np.int64)
        factor = np.asarray(payload["factor"])
        if factor.shape != (packed_length(ranks, gram.shape[0] - 1),):
            raise ValueError(f"The packed factor holds {factor.shape} values, its ranks need another length.")
        return cls(
            np.asarray(payload["items"], dtype=np.int64),
            np.asarray(payload["counts"], dtype=np.int64),
            ranks,
            factor,
            gram,
        )

    @property
    def dim(self) -> int:
        """The factor dimension d."""
        return self.gram.shape[0] - 1

    def offsets(self) -> np.ndarray:
        """``(n + 1,)`` where each item's packed values start (and the end)."""
        lengths = self.ranks * (self.dim + 1) - self.ranks * (self.ranks - 1) // 2
        return np.concatenate([[0], np.cumsum(lengths)])

    def rows(self, first: int, last: int, offsets: np.ndarray) -> np.ndarray:
        """The float64 factor rows of items ``[first, last)``, zero below each diagonal."""
        ranks = self.ranks[first:last]
        rows = np.zeros((int(ranks.sum()), self.dim + 1))
        rows[_trapezoid_mask(ranks, self.dim + 1)] = self.factor[offsets[first] : offsets[last]]
        return rows


def solve_items_packed(
    statistics: Sequence[PackedStatistics], config: IALSConfig, block_rows: int | None = None
) -> ItemFactors:
    """The server's item step (:func:`common.ials.steps.solve_items`) from packed statistics, items in blocks.

    Parameters
    ----------
    statistics : Sequence[PackedStatistics]
        One per market.
    config : IALSConfig
        Hyper-parameters (λ, ν, α).
    block_rows : int, optional
        Factor rows, summed over the markets, unpacked at once (default
        :data:`common.ials.steps.BLOCK_INTERACTIONS`; an item with more rows is a block alone).

    Returns
    -------
    ItemFactors
        Factors of every item some market sent.
    """
    dim, gram = summed_gram(statistics)
    items = np.unique(np.concatenate([part.items for part in statistics]))
    buyers, lengths = np.zeros(len(items)), np.zeros(len(items), dtype=np.int64)
    for part in statistics:
        where = np.searchsorted(items, part.items)
        buyers[where] += part.counts
        lengths[where] += part.ranks
    regularization = item_regularization(buyers, int(round(gram[dim, dim])), config)
    offsets = [part.offsets() for part in statistics]
    factors = np.zeros((len(items), dim))
    for first, last, _, _ in _segment_blocks(lengths, block_rows):
        low, high = items[first], items[last - 1]
        keys, pieces = [], []
        for part, offset in zip(statistics, offsets, strict=True):
            start, stop = np.searchsorted(part.items, [low, high + 1])
            keys.append(np.repeat(part.items[start:stop], part.ranks[start:stop]))
            pieces.append(part.rows(int(start), int(stop), offset))
        order = np.argsort(np.concatenate(keys), kind="stable")
        rows = np.concatenate(pieces)[order]
        factors[first:last] = _solve_segments(
            gram[:dim, :dim], rows[:, :dim], rows[:, dim], lengths[first:last], regularization[first:last]
        )
    return ItemFactors(items, factors)
