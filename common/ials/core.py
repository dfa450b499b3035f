"""Implicit alternating least squares (iALS), pooled and federated across markets.

The model scores user ``u`` and item ``i`` with ``x_u · y_i`` and minimises Hu, Koren and
Volinsky's weighted loss ("Collaborative Filtering for Implicit Feedback Datasets", ICDM 2008)
with the frequency-scaled regularisation of Rendle, Krichene, Zhang and Koren ("Revisiting the
Performance of iALS on Item Recommendation Benchmarks", RecSys 2022)::

    L(X, Y) = Σ_(u,i) observed  c_ui (1 − x_u·y_i)²  +  Σ_(u,i) unobserved (x_u·y_i)²
              + Σ_u λ_u ‖x_u‖²  +  Σ_i λ_i ‖y_i‖²

    c_ui = 1 + α·w_ui          confidence; w_ui = 1 (binary), r_ui (rating) or log(1 + r_ui/ε)
    λ_u  = λ·(|I_u| + |I|/α)^ν  |I_u| the user's training items, |I| the item rows with a factor
    λ_i  = λ·(|U_i| + |U|/α)^ν  |U_i| the item's buyers (all markets), |U| the users with one

|I| counts the rows of the item table that hold a factor (``item_rows``: non-zero rows, the rows
``YᵀY`` sums over), never the catalog's rows: a row nobody trained on has a zero factor and adds
no term to the loss's unobserved sum, so counting it only over-regularises the users (at a
million-row catalog of which 16% sell, ``|I|/α`` was 3,333 instead of about 530). The server
counts its table's non-zero rows and sends the number with the factors; before the first item
step every row holds its seeded factor, so |I| is the catalog's rows. |U| counts the users with
a training interaction (the markets' augmented Grams carry it): the mirror image.

ν = 0 is plain iALS (implicit's ``AlternatingLeastSquares`` with ``alpha_implicit = 1 + α``
on binary data, since implicit's confidence is ``alpha·r``). For binary confidence and any ν
this loss is Rendle et al.'s ``Σ_S (ŷ−1)² + α0 Σ_all ŷ² + λ_R Σ (|I_u| + α0|I|)^ν ‖x_u‖² + …``
with ``α0 = 1/α`` and ``λ_R = λ/(1 + α)``: divided by ``α0`` theirs is ours with the target
``α/(1+α)`` instead of 1, which only rescales the factors (and so λ by ``(1+α)/α``).

Each half-step is solved exactly. A user's normal equations are::

    (YᵀY + Σ_(i∈I_u) (c_ui − 1) y_i y_iᵀ + λ_u I) x_u = Σ_(i∈I_u) c_ui y_i

where ``YᵀY`` (the "every unobserved item is a zero with weight 1" term) runs over *all*
items. A market therefore needs only the rows of the items its users touched plus the global
Gram ``YᵀY`` (d×d), which the server sends. The item step is the mirror image::

    (XᵀX + Σ_(u∈U_i) (c_ui − 1) x_u x_uᵀ + λ_i I) y_i = Σ_(u∈U_i) c_ui x_u

and every term is a sum over users, so it splits across markets: ``XᵀX = Σ_m X_mᵀX_m``, and
per item ``A_i = Σ_m A_i^m``, ``b_i = Σ_m b_i^m``. A market sends, for each item it touched,
one matrix that holds both ``A_i^m`` and ``b_i^m``: with ``z_u = [√(c−1)·x_u, c/√(c−1)]``
(d + 1 numbers per buyer), ``S_i^m = Σ_u z_u z_uᵀ`` carries ``A_i^m`` in its leading d×d block
and ``b_i^m`` in its last column. ``S_i^m`` has rank ``r ≤ min(k_i, d + 1)`` for ``k_i``
buyers, so the market sends its upper-trapezoidal factor ``R`` (r × (d+1), ``RᵀR = S``) packed
row by row without the zeros below the diagonal: ``r(d+1) − r(r−1)/2`` numbers, which is the
packed triangle of ``S`` when ``r = d + 1`` and ``k_i·(d+1) − k_i(k_i−1)/2`` when ``k_i ≤ d``.
``R`` has a non-negative diagonal, which makes it *the* factor of ``S`` whenever its leading
r×r block is regular (the generic case), so it is a function of the sum alone; otherwise (a
zero pivot, e.g. two buyers with identical factors) it is recomputed from ``S`` itself. Nothing
user-indexed leaves a market: item rows, buyer counts, the factors of per-item sums and the
market's augmented Gram ``Σ_u [x_u, 1][x_u, 1]ᵀ`` (``XᵀX``, ``Σ_u x_u`` and the user count).

Items nobody touched get a zero factor: with no buyer their right-hand side is zero, so zero
is the exact solution of their least-squares problem. Pooled iALS on the same table does the
same, and a zero row adds nothing to ``YᵀY``.

Both solves use the eigenbasis of the Gram (``G = QΛQᵀ``) and the push-through identity
``(D + FᵀF)⁻¹Fᵀt = D⁻¹Fᵀ(I + FD⁻¹Fᵀ)⁻¹t`` with ``D = Λ + λ_s``: a row block of ``k < d`` rows
costs a k×k solve instead of a d×d one, which is exact and keeps a pooled run at seconds.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np

Confidence = Literal["binary", "rating", "log"]
CONFIDENCES: tuple[str, ...] = ("binary", "rating", "log")


@dataclass(frozen=True)
class IALSConfig:
    """Hyper-parameters of iALS, named after the symbols of the module docstring.

    Parameters
    ----------
    factors : int
        Dimension d of the user and item factors.
    regularization : float
        λ, the L2 weight (scaled per row by the frequency term when ``nu`` > 0).
    alpha : float
        α: a positive's confidence is ``c = 1 + α·w``; must be positive.
    nu : float
        ν, the exponent of the frequency-scaled regularisation; 0 is plain iALS.
    iterations : int
        Item steps; users are solved once more against the final items.
    confidence : {"binary", "rating", "log"}
        How the weight ``w`` of a positive follows from its rating ``r``: 1, ``r`` or
        ``log(1 + r/ε)``.
    epsilon : float
        ε of the ``log`` confidence.
    init_std : float
        Standard deviation of the initial item factors.
    seed : int
        Seeds the initial item factors (nothing else is random).
    """

    factors: int = 64
    regularization: float = 1.0
    alpha: float = 10.0
    nu: float = 0.0
    iterations: int = 15
    confidence: Confidence = "binary"
    epsilon: float = 1.0
    init_std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.factors < 1 or self.iterations < 0:
            raise ValueError(f"iALS needs factors >= 1 and iterations >= 0, got {self.factors} and {self.iterations}.")
        if not self.regularization > 0 or not self.alpha > 0 or self.nu < 0:
            raise ValueError(
                "iALS needs regularization > 0, alpha > 0 and nu >= 0, got "
                f"{self.regularization}, {self.alpha} and {self.nu}."
            )
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"Unknown confidence '{self.confidence}'; choose one of {CONFIDENCES}.")
        if not self.epsilon > 0 or not self.init_std > 0:
            raise ValueError(f"iALS needs epsilon > 0 and init_std > 0, got {self.epsilon} and {self.init_std}.")


@dataclass(frozen=True)
class MarketInteractions:
    """One market's training interactions: local user index and catalog row per positive.

    Parameters
    ----------
    users : np.ndarray
        ``(m,)`` local user index of each interaction, in ``[0, num_users)``.
    items : np.ndarray
        ``(m,)`` catalog row of each interaction.
    num_users : int
        Users of the market (a user without interactions gets a zero factor).
    ratings : np.ndarray or None
        ``(m,)`` rating of each interaction; needed by the ``rating`` and ``log`` confidences.
    """

    users: np.ndarray
    items: np.ndarray
    num_users: int
    ratings: np.ndarray | None = None

    def __post_init__(self) -> None:
        users, items = np.asarray(self.users, dtype=np.int64), np.asarray(self.items, dtype=np.int64)
        if users.shape != items.shape or users.ndim != 1:
            raise ValueError(f"Users and items must be equal-length vectors, got {users.shape} and {items.shape}.")
        if len(users) and (users.min() < 0 or users.max() >= self.num_users):
            raise ValueError(f"User indices must lie in [0, {self.num_users}).")
        if len(items) and items.min() < 0:
            raise ValueError("Catalog rows must be non-negative.")
        object.__setattr__(self, "users", users)
        object.__setattr__(self, "items", items)
        if self.ratings is not None:
            ratings = np.asarray(self.ratings, dtype=np.float64)
            if ratings.shape != users.shape:
                raise ValueError(f"Ratings must match the interactions, got {ratings.shape} for {users.shape}.")
            object.__setattr__(self, "ratings", ratings)

    def weights(self, config: IALSConfig) -> np.ndarray:
        """The weight ``w`` of each interaction (confidence ``c = 1 + α·w``)."""
        return confidence_weights(self.ratings, config, len(self.users))


@dataclass(frozen=True)
class ItemFactors:
    """Factors of some rows of the item table; rows not listed are zero.

    Parameters
    ----------
    rows : np.ndarray
        ``(n,)`` sorted, distinct catalog rows.
    factors : np.ndarray
        ``(n, d)`` their factors.
    """

    rows: np.ndarray
    factors: np.ndarray

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows, dtype=np.int64)
        factors = np.asarray(self.factors, dtype=np.float64)
        if rows.ndim != 1 or factors.ndim != 2 or len(rows) != len(factors):
            raise ValueError(f"Item factors need (n,) rows and (n, d) factors, got {rows.shape} and {factors.shape}.")
        if len(rows) > 1 and np.any(np.diff(rows) <= 0):
            raise ValueError("Item factor rows must be sorted and distinct.")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "factors", factors)

    @property
    def dim(self) -> int:
        """The factor dimension d."""
        return self.factors.shape[1]

    def gram(self) -> np.ndarray:
        """``YᵀY`` over these rows (d×d); the zero rows not listed add nothing."""
        return self.factors.T @ self.factors

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Factors of catalog ``rows`` (any shape), zero for rows not listed."""
        return lookup_rows(self.rows, self.factors, rows)

    def subset(self, rows: np.ndarray) -> "ItemFactors":
        """The factors of ``rows`` (sorted and de-duplicated; missing rows come back as zeros)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        return ItemFactors(rows, self.lookup(rows))

    def held_rows(self) -> int:
        """The rows with a non-zero factor: |I| of the frequency-scaled user regularisation."""
        return int(np.count_nonzero(np.any(self.factors != 0.0, axis=1)))

    def to_dense(self, num_items: int) -> np.ndarray:
        """The whole ``(num_items, d)`` table."""
        dense = np.zeros((num_items, self.dim))
        dense[self.rows] = self.factors
        return dense


def lookup_rows(held: np.ndarray, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values`` of the sorted table rows ``held`` at catalog ``rows`` (any shape); zero for rows not held.

    The result has ``values``' dtype, so a float32 table is looked up without a float64 copy.
    """
    index = row_positions(held, rows)
    found = index < len(held)
    out = np.zeros((*index.shape, values.shape[1]), dtype=values.dtype)
    out[found] = values[index[found]]
    return out


def row_positions(held: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The position of each catalog row of ``rows`` (any shape) among the sorted ``held``; ``len(held)`` where absent.

    A table with a zero row appended after ``held``'s looks every row up in one gather.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not len(held):
        return np.zeros(rows.shape, dtype=np.int64)
    position = np.searchsorted(held, rows).clip(max=len(held) - 1)
    return np.where(held[position] == rows, position, len(held))


@dataclass(frozen=True)
class ItemStatistics:
    """What one market contributes to the item step: user-summed, item-indexed statistics.

    ``rows`` stacks, item after item, the upper-trapezoidal factor ``R_i`` of
    ``S_i = Σ_u z_u z_uᵀ`` with ``z_u = [√(c_ui−1)·x_u, c_ui/√(c_ui−1)]`` over the item's
    buyers (module docstring): ``R_iᵀR_i[:d, :d] = A_i`` and ``R_iᵀR_i[:d, d] = b_i``.

    Parameters
    ----------
    items : np.ndarray
        ``(n,)`` sorted catalog rows the market has interactions on.
    counts : np.ndarray
        ``(n,)`` buyers of each item in the market (|U_i^m|).
    ranks : np.ndarray
        ``(n,)`` rows of each item's factor, ``1 ≤ r ≤ min(count, d + 1)``.
    rows : np.ndarray
        ``(Σ ranks, d + 1)`` the factors, zero below each factor's diagonal.
    gram : np.ndarray
        ``(d + 1, d + 1)`` ``Σ_u [x_u, 1][x_u, 1]ᵀ`` over the market's users with a factor
        (a training interaction): ``XᵀX`` in the leading block, their count in the corner.
    """

    items: np.ndarray
    counts: np.ndarray
    ranks: np.ndarray
    rows: np.ndarray
    gram: np.ndarray

    @property
    def dim(self) -> int:
        """The factor dimension d."""
        return self.gram.shape[0] - 1

    @property
    def num_users(self) -> int:
        """Users of the market with a training interaction (the corner of the augmented Gram)."""
        return int(round(self.gram[-1, -1]))


# --- confidence, regularisation, initialisation -------------------------------------------


def confidence_weights(ratings: np.ndarray | None, config: IALSConfig, size: int | None = None) -> np.ndarray:
    """Weights ``w`` of positives (confidence ``c = 1 + α·w``) under ``config.confidence``.

    Parameters
    ----------
    ratings : np.ndarray or None
        Ratings of the positives; ignored (and optional) for binary confidence.
    config : IALSConfig
        Chooses the form: 1, ``r`` or ``log(1 + r/ε)``.
    size : int, optional
        Number of positives when ``ratings`` is None.

    Returns
    -------
    np.ndarray
        Positive weights, float64.
    """
    if config.confidence == "binary":
        count = size if ratings is None else len(ratings)
        return np.ones(count if count is not None else 0)
    if ratings is None:
        raise ValueError(f"Confidence '{config.confidence}' needs the ratings of the interactions.")
    ratings = np.asarray(ratings, dtype=np.float64)
    if len(ratings) and not ratings.min() > 0:
        raise ValueError(f"Confidence '{config.confidence}' needs positive ratings, got {ratings.min()}.")
    if config.confidence == "rating":
        return ratings
    return np.log1p(ratings / config.epsilon)


def user_regularization(counts: np.ndarray, item_rows: int, config: IALSConfig) -> np.ndarray:
    """``λ_u = λ·(|I_u| + |I|/α)^ν`` for users with ``counts`` training items; |I| = ``item_rows``."""
    return config.regularization * (np.asarray(counts, dtype=np.float64) + item_rows / config.alpha) ** config.nu


def item_regularization(counts: np.ndarray, num_users: int, config: IALSConfig) -> np.ndarray:
    """``λ_i = λ·(|U_i| + |U|/α)^ν`` for items with ``counts`` buyers over all markets."""
    return config.regularization * (np.asarray(counts, dtype=np.float64) + num_users / config.alpha) ** config.nu


def _splitmix64(values: np.ndarray) -> np.ndarray:
    # A counter-based generator: output n depends on n alone, so any subset of rows can be
    # drawn on its own and agrees with the whole table (uint64 arithmetic wraps by design).
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def initial_item_factors(rows: np.ndarray, factors: int, seed: int, std: float = 0.01) -> np.ndarray:
    """Seeded normal initial factors of catalog ``rows``, ``(len(rows), factors)``.

    Entry ``(row, k)`` depends only on ``(seed, row, k)``: a market draws the rows it needs,
    the server the Gram of the whole table (:func:`initial_item_gram`), and they agree. Each
    entry hashes its counter once (SplitMix64) into two 32-bit uniforms for Box–Muller.
    """
    rows = np.asarray(rows, dtype=np.uint64)
    key = _splitmix64(np.array([seed], dtype=np.uint64))[0]
    bits = _splitmix64((rows[:, None] * np.uint64(factors) + np.arange(factors, dtype=np.uint64)) ^ key)
    radius = np.sqrt(-2.0 * np.log(1.0 - (bits >> np.uint64(32)).astype(np.float64) * 2.0**-32))  # u1 in (0, 1]
    angle = (2.0 * np.pi * 2.0**-32) * (bits & np.uint64(0xFFFFFFFF)).astype(np.float64)
    return std * radius * np.cos(angle)


def initial_item_gram(num_items: int, factors: int, seed: int, std: float = 0.01, chunk: int = 65536) -> np.ndarray:
    """``YᵀY`` of the initial factors of all ``num_items`` rows, drawn chunk by chunk."""
    gram = np.zeros((factors, factors))
    for start in range(0, num_items, chunk):
        block = initial_item_factors(np.arange(start, min(start + chunk, num_items)), factors, seed, std)
        gram += block.T @ block
    return gram


def initial_item_factors_table(rows: np.ndarray, config: IALSConfig) -> ItemFactors:
    """The initial :class:`ItemFactors` of ``rows`` under ``config``."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    return ItemFactors(rows, initial_item_factors(rows, config.factors, config.seed, config.init_std))


# --- the user step (inside a market) ------------------------------------------------------------
