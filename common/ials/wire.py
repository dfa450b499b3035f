"""fedals on the wire: what a market sends and receives, packed as flat arrays, and the whole protocol in one process.

A market's :class:`common.ials.ItemStatistics` travel as the item rows, their buyer counts and
ranks, the packed upper-trapezoidal factors (:func:`pack_statistics`: float32, or float16 to
halve them) and the augmented Gram; the server sends each market the item factors of its rows,
the Gram ``YᵀY`` and the count of the table's rows with a factor (:func:`pack_item_factors`).
:func:`check_item_side` refuses a payload with anything user-indexed. :func:`federated_ials` runs
the protocol in one process, every message through this format, and must equal
:func:`common.ials.pooled_ials`.
"""

import io
from collections.abc import Mapping

import numpy as np

from common.ials.core import ItemFactors, ItemStatistics
from common.ials.kernels import segment_starts

STATISTICS_KEYS = ("items", "counts", "ranks", "factor", "gram")


def _trapezoid_mask(ranks: np.ndarray, width: int) -> np.ndarray:
    """Which entries of the stacked factor rows lie on or above their factor's diagonal."""
    within = np.arange(len(np.repeat(ranks, ranks))) - np.repeat(segment_starts(ranks), ranks)
    return np.arange(width)[None, :] >= within[:, None]


def packed_length(ranks: np.ndarray, dim: int) -> int:
    """Floats of the packed factors: ``Σ r(d+1) − r(r−1)/2``."""
    ranks = np.asarray(ranks, dtype=np.int64)
    return int(np.sum(ranks * (dim + 1) - ranks * (ranks - 1) // 2))


WIRE_DTYPES = ("float32", "float16")


def pack_statistics(statistics: ItemStatistics, wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """A market's statistics as a flat dict of arrays for the wire.

    Parameters
    ----------
    statistics : ItemStatistics
        From :func:`market_item_statistics`.
    wire_dtype : {"float32", "float16"}
        Precision of the packed factors. float32 keeps fedals equal to pooled iALS to ~1e-7;
        float16 halves the bulk of the bytes at ~1e-3 relative precision of each item's sum.

    Returns
    -------
    dict[str, np.ndarray]
        ``items`` (n,) int64 catalog rows; ``counts`` and ``ranks`` (n,) int32; ``factor``
        the factors' entries on and above their diagonals, row after row, item after item
        (``wire_dtype``, :func:`packed_length` long); ``gram`` (d+1, d+1) float32.
    """
    return {
        "items": statistics.items.astype(np.int64),
        "counts": statistics.counts.astype(np.int32),
        "ranks": statistics.ranks.astype(np.int32),
        "factor": packed_values(statistics.rows, statistics.ranks, wire_dtype),
        "gram": statistics.gram.astype(np.float32),
    }


def packed_values(rows: np.ndarray, ranks: np.ndarray, wire_dtype: str) -> np.ndarray:
    """The entries on and above the diagonals of stacked factor ``rows`` (of ``ranks``), in ``wire_dtype``.

    Raises ValueError for an unknown wire type or an entry it cannot hold.
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"Unknown wire dtype '{wire_dtype}'; choose one of {WIRE_DTYPES}.")
    values = rows[_trapezoid_mask(ranks, rows.shape[1])]
    largest = float(np.abs(values).max(initial=0.0))
    if largest > float(np.finfo(wire_dtype).max):
        raise ValueError(f"A factor entry of {largest:.3g} does not fit {wire_dtype}; send float32.")
    return values.astype(wire_dtype)


def unpack_statistics(payload: Mapping[str, np.ndarray]) -> ItemStatistics:
    """The statistics :func:`pack_statistics` packed (in float64)."""
    missing = [key for key in STATISTICS_KEYS if key not in payload]
    if missing:
        raise ValueError(f"The statistics lack the arrays {missing}.")
    gram = np.asarray(payload["gram"], dtype=np.float64)
    width = gram.shape[0]
    ranks = np.asarray(payload["ranks"], dtype=np.int64)
    values = np.asarray(payload["factor"], dtype=np.float64)
    if values.shape != (packed_length(ranks, width - 1),):
        expected = packed_length(ranks, width - 1)
        raise ValueError(f"The packed factor holds {values.shape} values, its ranks need {expected}.")
    rows = np.zeros((int(ranks.sum()), width))
    rows[_trapezoid_mask(ranks, width)] = values
    return ItemStatistics(
        items=np.asarray(payload["items"], dtype=np.int64),
        counts=np.asarray(payload["counts"], dtype=np.int64),
        ranks=ranks,
        rows=rows,
        gram=gram,
    )


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays of a payload (what goes on the wire, before framing)."""
    return int(sum(np.asarray(array).nbytes for array in payload.values()))


def check_item_side(payload: Mapping[str, np.ndarray], touched_items: np.ndarray, d: int) -> None:
    """Raise ValueError unless every array of ``payload`` is item-indexed or d-sized.

    Allowed: ``items`` equal to the sorted ``touched_items``; arrays whose first dimension is
    the number of touched items; arrays whose first dimension is ``d`` or ``d + 1`` (Grams
    summed over the market's users); and ``factor``, whose length must be exactly what the
    item-indexed ``ranks`` imply, each rank at most ``min(count, d + 1)`` (a per-item sum over
    k buyers has rank at most k). Anything else may carry a user axis.

    Parameters
    ----------
    payload : Mapping[str, np.ndarray]
        What a market sends.
    touched_items : np.ndarray
        Catalog rows the market has training interactions on.
    d : int
        The factor dimension.
    """
    touched = np.unique(np.asarray(touched_items, dtype=np.int64))
    n = len(touched)
    if "items" not in payload:
        raise ValueError("The payload has no 'items' array naming the item of each row.")
    items = np.asarray(payload["items"])
    if items.shape != (n,) or not np.array_equal(items, touched):
        raise ValueError(f"Array 'items' {items.shape} is not the market's {n} touched items in order.")
    for name, array in payload.items():
        shape = np.shape(array)
        if name == "items":
            continue
        if name == "factor":
            ranks = np.asarray(payload.get("ranks", []))
            counts = np.asarray(payload.get("counts", []))
            if ranks.shape != (n,) or counts.shape != (n,):
                raise ValueError("Array 'factor' needs item-indexed 'ranks' and 'counts' of the touched items.")
            if np.any(ranks < 1) or np.any(ranks > np.minimum(counts, d + 1)):
                raise ValueError("Array 'ranks' exceeds what per-item sums over the items' buyers allow.")
            if shape != (packed_length(ranks, d),):
                expected = packed_length(ranks, d)
                raise ValueError(f"Array 'factor' has shape {shape}, not the {expected} values its ranks imply.")
            continue
        if len(shape) == 0 or shape[0] not in (n, d, d + 1):
            raise ValueError(
                f"Array '{name}' has shape {shape}: its first dimension is neither the {n} touched "
                f"items nor the dimension {d} (or {d + 1}), so it may be indexed by user."
            )
        if shape[0] != n and any(size not in (d, d + 1) for size in shape):
            raise ValueError(f"Array '{name}' has shape {shape}: a d-sized array must be d×d (or (d+1)×(d+1)).")


ITEM_ROWS_KEY = "item-rows"  # array (1,) int64, server -> market: the table's rows with a factor (|I|)
ITEM_SIDE_KEYS = ("items", "factors", "gram", ITEM_ROWS_KEY)  # what pack_item_factors sends


def pack_item_factors(items: ItemFactors, gram: np.ndarray, item_rows: int) -> dict[str, np.ndarray]:
    """What the server sends a market: its rows' factors, the global Gram (float32) and how many
    rows of the whole table hold a factor (|I| of the user regularisation, :mod:`common.ials.core`)."""
    return {
        "items": items.rows.astype(np.int64),
        "factors": items.factors.astype(np.float32),
        "gram": gram.astype(np.float32),
        ITEM_ROWS_KEY: np.array([item_rows], dtype=np.int64),
    }


def unpack_item_factors(payload: Mapping[str, np.ndarray]) -> tuple[ItemFactors, np.ndarray, int]:
    """The item factors and Gram :func:`pack_item_factors` packed (in float64), and the rows with a factor."""
    count = np.asarray(payload[ITEM_ROWS_KEY])
    if count.shape != (1,) or not np.issubdtype(count.dtype, np.integer):
        raise ValueError(f"{ITEM_ROWS_KEY!r} is {count.dtype} {count.shape}, not one whole number")
    return (
        ItemFactors(np.asarray(payload["items"]), np.asarray(payload["factors"], dtype=np.float64)),
        np.asarray(payload["gram"], dtype=np.float64),
        int(count[0]),
    )


def item_rows_problem(item_rows: int, items: ItemFactors, num_items: int) -> str | None:
    """What is wrong with the server's count of rows with a factor, or None.

    It must lie between the non-zero rows the server sent the market and the catalog's rows:
    a count outside that cannot describe a table holding the sent factors.
    """
    if not items.held_rows() <= item_rows <= num_items:
        return (
            f"{ITEM_ROWS_KEY!r} {item_rows} is not between the {items.held_rows()} non-zero rows it sent "
            f"and the catalog's {num_items} rows"
        )
    return None


ASSORTMENT_KEY = "assortment"  # reply array: the market's sorted assortment rows, what the server sends it next
INITIAL_ROWS_KEY = "fedals-initial-rows"  # config: no rows sent, draw the seeded initial factors of your assortment
REPLY_KEYS = (*STATISTICS_KEYS, ASSORTMENT_KEY)


# --- what a market replies ------------------------------------------------------------------------


def rows_problem(name: str, rows: np.ndarray, num_items: int) -> str | None:
    """What is wrong with a reply's catalog rows ``name``, or None: whole numbers, in the catalog, sorted, distinct."""
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        return f"array {name!r} is {rows.dtype} {rows.shape}, not a vector of whole numbers"
    if len(rows) and (rows.min() < 0 or rows.max() >= num_items):
        return f"array {name!r} holds rows outside the catalog's {num_items}"
    if np.any(np.diff(rows) <= 0):
        return f"array {name!r} is not sorted and distinct"
    return None


def floats_problem(name: str, array: np.ndarray) -> str | None:
    """What is wrong with a reply's float array ``name``, or None: a float type, finite values."""
    if not np.issubdtype(array.dtype, np.floating):
        return f"array {name!r} is {array.dtype}, not float"
    if not np.isfinite(array).all():
        return f"array {name!r} holds {int((~np.isfinite(array)).sum())} non-finite values"
    return None


INTEGER_WIRE = ("int64", "int32")  # the integer arrays' types on the wire
NPY_HEADER = 4096  # bytes an array's serialised form may hold beyond its values (numpy's .npy header)


def declared_reply_problem(
    declared: Mapping[str, tuple[str, tuple[int, ...], int]], num_items: int, dim: int
) -> str | None:
    """What is wrong with a fedals reply from its arrays' declared types and sizes alone, or None.

    Checked before anything is decoded, so that a reply's size is bounded by what its market
    may send: at most the catalog's rows in its assortment, statistics of at most those items,
    at most ``(d+1)(d+2)/2`` packed values per item (a full-rank factor), a (d+1)² Gram, and
    serialised bytes that match the declared shape.

    Parameters
    ----------
    declared : Mapping[str, tuple[str, tuple[int, ...], int]]
        Per array name, its declared dtype, declared shape and the length of its serialised bytes.
    num_items : int
        Rows of the item table.
    dim : int
        The factor dimension d.
    """
    if set(declared) != set(REPLY_KEYS):
        missing, extra = sorted(set(REPLY_KEYS) - set(declared)), sorted(set(declared) - set(REPLY_KEYS))
        return f"its arrays are not fedals' statistics: missing {missing}, unexpected {len(extra)} ({extra[:5]})"
    expected = {name: INTEGER_WIRE for name in ("items", "counts", "ranks", ASSORTMENT_KEY)}
    expected |= {"factor": WIRE_DTYPES, "gram": ("float32",)}
    for name, (dtype, shape, size) in declared.items():
        if dtype not in expected[name]:
            return f"array {name!r} is not declared as one of {expected[name]}"
        if len(shape) != (2 if name == "gram" else 1) or any(not n >= 0 for n in shape):
            return f"array {name!r} is declared with {len(shape)} dimensions or a negative one"
        if size > int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + NPY_HEADER:
            return f"array {name!r} holds {size} bytes, more than its declared {dtype} {shape}"
    length = {name: declared[name][1][0] for name in declared}
    if length[ASSORTMENT_KEY] > num_items:
        return f"its assortment declares {length[ASSORTMENT_KEY]} rows, more than the catalog's {num_items}"
    if not length["items"] == length["counts"] == length["ranks"] <= length[ASSORTMENT_KEY]:
        return "its item-indexed arrays differ in length or exceed its assortment"
    if length["factor"] > length["items"] * (dim + 1) * (dim + 2) // 2:
        return f"its factor declares {length['factor']} values, more than full-rank factors of its items hold"
    if declared["gram"][1] != (dim + 1, dim + 1):
        return f"its Gram is declared {declared['gram'][1]}, not ({dim + 1}, {dim + 1}) for {dim} factors"
    return None


class UnknownNpyVersion(ValueError):
    """Serialised array bytes of a ``.npy`` version other than 1.0 and 2.0."""


def read_npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The shape, Fortran order, dtype and values' offset of ``.npy`` 1.0 or 2.0 bytes, from the header alone.

    Raises :class:`UnknownNpyVersion` for another version, and numpy's errors (ValueError and
    others) for bytes that are not an array.
    """
    stream = io.BytesIO(data)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    read = readers.get(np.lib.format.read_magic(stream))
    if read is None:
        raise UnknownNpyVersion("The bytes are not an array of a known .npy version.")
    shape, fortran_order, dtype = read(stream)
    return tuple(shape), fortran_order, dtype, stream.tell()


def npy_header_problem(data: bytes, dtype: str, shape: tuple[int, ...]) -> str | None:
    """What is wrong with serialised array bytes whose ``.npy`` header is not ``dtype`` and ``shape``, or None.

    ``numpy.load`` allocates what the header claims before it reads the values; reading the
    header alone first keeps a reply from claiming more than its declaration, which the
    caller has bounded.
    """
    try:
        header_shape, fortran_order, header_dtype, _ = read_npy_header(data)
    except UnknownNpyVersion:
        return "its bytes are not an array of a known .npy version"
    except (ValueError, SyntaxError, EOFError, TypeError) as error:
        return f"its bytes are not an array ({type(error).__name__})"
    if tuple(header_shape) != tuple(shape) or header_dtype != np.dtype(dtype) or fortran_order:
        return "its bytes hold another array than it declares"
    return None


def reply_problem(payload: Mapping[str, np.ndarray], num_items: int, dim: int) -> str | None:
    """What is wrong with a fedals train reply's arrays, or None.

    A reply holds exactly :data:`REPLY_KEYS`: integer item rows inside the catalog, sorted and
    distinct, the touched ``items`` among the ``assortment``; shapes consistent with ``dim``
    and the ranks, and nothing that may carry a user axis (:func:`common.ials_wire.check_item_side`);
    float, finite values.

    Parameters
    ----------
    payload : Mapping[str, np.ndarray]
        The reply's arrays by name.
    num_items : int
        Rows of the item table.
    dim : int
        The factor dimension d the server solves with.
    """
    if set(payload) != set(REPLY_KEYS):
        missing, extra = sorted(set(REPLY_KEYS) - set(payload)), sorted(set(payload) - set(REPLY_KEYS))
        return f"its arrays are not fedals' statistics: missing {missing}, unexpected {extra}"
    for name in ("items", "counts", "ranks", ASSORTMENT_KEY):
        if payload[name].ndim != 1 or not np.issubdtype(payload[name].dtype, np.integer):
            return f"array {name!r} is {payload[name].dtype} {payload[name].shape}, not a vector of whole numbers"
    for name in ("factor", "gram"):
        if problem := floats_problem(name, payload[name]):
            return problem
    assortment, items = payload[ASSORTMENT_KEY], payload["items"]
    for name, rows in ((ASSORTMENT_KEY, assortment), ("items", items)):
        if problem := rows_problem(name, rows, num_items):
            return problem
    if not np.isin(items, assortment).all():
        return "it has statistics of items outside the assortment it declares"
    if payload["gram"].shape != (dim + 1, dim + 1):
        return f"its Gram is {payload['gram'].shape}, not ({dim + 1}, {dim + 1}) for {dim} factors"
    try:
        check_item_side({name: payload[name] for name in STATISTICS_KEYS}, items, dim)
    except ValueError as error:
        return str(error)
    return None
