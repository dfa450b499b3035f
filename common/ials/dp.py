"""DP-fedals: what a market releases each round under user-level DP, and the item step the server solves from it.

Without DP a market sends, per item it sells, the exact factor of ``Σ_u z_u z_uᵀ`` over the item's
buyers (:mod:`common.ials.wire`): an item bought by one user carries that user's factor. Under DP
(private ALS, Chien et al., ICML 2021, adapted to implicit feedback) a market instead releases
sums in which one user moves a bounded amount, with Gaussian noise:

* every user factor is scaled to unit norm, ``x̄_u = x_u / ‖x_u‖``, and a user with ``n_u`` items
  weighs ``s_u = min(1, √(k/n_u))`` on each, so that the user's whole contribution is bounded;
* ``sums``: per item of the market's assortment (public), ``Σ_{u∈U_i} s_u x̄_u``: L2 sensitivity √k;
* ``counts``: per item, ``Σ_{u∈U_i} s_u``: sensitivity √k;
* ``gram``: ``Σ_u x̄_u x̄_uᵀ`` (upper triangle): sensitivity 1;
* ``interaction-gram``: ``Σ_u n_u s_u² x̄_u x̄_uᵀ`` (upper triangle): sensitivity k.

Each block gets noise of its sensitivity times its own multiplier; the blocks together are one
Gaussian mechanism whose multiplier is ``1/√(Σ 1/σ_b²)`` (:func:`block_noise_multipliers`),
which the ledger records once per round at sample rate 1. The neighbouring relation is adding
or removing one user with all their interactions; the sensitivities above are for it. A user's
pairs are counted once per row (two item IDs hashed to one overflow row are one pair), so the
bound holds whatever the IDs. The released rows are public (the region's product list or the
catalog: :func:`common.region.public_assortment`); an interaction outside them is left out. The
weight beside the release is the user count the market released with noise, never the count.

The server sums the markets' releases and solves every item with the buyer-specific term of
iALS replaced by its expectation, ``A_i ≈ n̂_i·M̄`` with ``M̄`` the interaction Gram over the
interactions:
``(G + α n̂_i M̄ + λ_i I) y_i = (1 + α) b̂_i`` (binary confidence; noisy Grams projected onto the
PSD cone, noisy counts clipped at 0). Without noise this approximation costs about 0.035 macro
NDCG@10 on XMarket against exact fedals; its point is that every quantity in it has a bounded
sensitivity.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.ials.core import IALSConfig, ItemFactors, MarketInteractions, item_regularization
from common.ials.wire import ASSORTMENT_KEY, floats_problem, rows_problem

RELEASE_KEYS = ("sums", "counts", "gram", "interaction-gram")
_SOLVE_CHUNK = 1024  # items per batched d×d solve: 128 MB of float64 at d = 128


@dataclass(frozen=True)
class ReleaseConfig:
    """How a market bounds a user's contribution and splits the noise between the blocks."""

    items_per_user: int = 8  # k: a user with more items weighs √(k/n_u) on each (5-core users rarely have more)
    side_noise_ratio: float = 4.0  # counts and Grams get this many times the sums' multiplier: they sum many users

    def __post_init__(self) -> None:
        if self.items_per_user < 1:
            raise ValueError(f"A user's items must be bounded by at least 1, got {self.items_per_user}.")
        if not self.side_noise_ratio > 0:
            raise ValueError(f"The side blocks' noise ratio must be positive, got {self.side_noise_ratio}.")


def block_noise_multipliers(noise_multiplier: float, release: ReleaseConfig) -> tuple[float, float]:
    """The sums' multiplier and the other three blocks', which together make one mechanism of ``noise_multiplier``.

    With ``σ_side = r·σ_sums`` over four blocks: ``σ = σ_sums / √(1 + 3/r²)``.
    """
    if noise_multiplier < 0:
        raise ValueError(f"A noise multiplier cannot be negative, got {noise_multiplier}.")
    sums = noise_multiplier * np.sqrt(1.0 + 3.0 / release.side_noise_ratio**2)
    return float(sums), float(sums * release.side_noise_ratio)


def noise_generator(insecure_seed: int | None = None) -> np.random.Generator:
    """A generator for DP noise seeded from ``os.urandom``; ``insecure_seed`` only for reproducible experiments."""
    seed = int.from_bytes(os.urandom(16), "little") if insecure_seed is None else insecure_seed
    return np.random.default_rng(seed)


def private_release(
    market: MarketInteractions,
    user_factors: np.ndarray,
    rows: np.ndarray,
    noise_multiplier: float,
    generator: np.random.Generator,
    release: ReleaseConfig = ReleaseConfig(),
) -> dict[str, np.ndarray]:
    """One round's release of a market: the four blocks of the module docstring, noised.

    Parameters
    ----------
    market : MarketInteractions
        The market's training interactions.
    user_factors : np.ndarray
        ``(num_users, d)`` solved on the received items; a zero row (no interaction) adds nothing.
    rows : np.ndarray
        The market's assortment (sorted catalog rows, public): the items released.
    noise_multiplier : float
        σ of the whole mechanism (0: no noise, for tests and the non-private reference).
    generator : np.random.Generator
        :func:`noise_generator`, never a configured seed outside insecure experiments.
    release : ReleaseConfig
        k and the noise split.

    Returns
    -------
    dict[str, np.ndarray]
        ``sums`` (n, d), ``counts`` (n,), ``gram`` and ``interaction-gram`` (d, d), float32.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and np.any(np.diff(rows) <= 0):
        raise ValueError("The released rows must be sorted and distinct.")
    factors = np.asarray(user_factors, dtype=np.float64)
    norms = np.linalg.norm(factors, axis=1)
    unit = np.divide(factors, norms[:, None], out=np.zeros_like(factors), where=norms[:, None] > 0)
    users, position = _released_pairs(market, rows)
    per_user = np.bincount(users, minlength=market.num_users).astype(np.float64)
    weight = np.minimum(1.0, np.sqrt(release.items_per_user / np.maximum(per_user, 1.0)))
    weight[norms == 0] = 0.0
    dim = factors.shape[1]
    sums = np.zeros((len(rows), dim))
    np.add.at(sums, position, weight[users, None] * unit[users])
    counts = np.bincount(position, weights=weight[users], minlength=len(rows)).astype(np.float64)
    gram = unit.T @ unit
    interaction_gram = (unit * (per_user * weight**2)[:, None]).T @ unit
    sigma_sums, sigma_side = block_noise_multipliers(noise_multiplier, release)
    if noise_multiplier > 0:
        root_k = np.sqrt(release.items_per_user)
        sums += generator.normal(0.0, sigma_sums * root_k, sums.shape)
        counts += generator.normal(0.0, sigma_side * root_k, counts.shape)
        gram += _symmetric_noise(generator, sigma_side, dim)
        interaction_gram += _symmetric_noise(generator, sigma_side * release.items_per_user, dim)
    return {
        "sums": sums.astype(np.float32),
        "counts": counts.astype(np.float32),
        "gram": gram.astype(np.float32),
        "interaction-gram": interaction_gram.astype(np.float32),
    }


def zero_release(num_rows: int, dim: int) -> dict[str, np.ndarray]:
    """A release of zeros in :func:`private_release`'s shape: what a market out of budget sends (nothing of it)."""
    return {
        "sums": np.zeros((num_rows, dim), np.float32),
        "counts": np.zeros(num_rows, np.float32),
        "gram": np.zeros((dim, dim), np.float32),
        "interaction-gram": np.zeros((dim, dim), np.float32),
    }


def _released_pairs(market: MarketInteractions, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (user, position in ``rows``) pairs of the market's interactions on ``rows``.

    Distinct, so that one user adds at most one term to a row however many of their items
    map to it; interactions outside ``rows`` are left out of the release.
    """
    users = np.asarray(market.users, dtype=np.int64)
    items = np.asarray(market.items, dtype=np.int64)
    position = np.minimum(np.searchsorted(rows, items), max(len(rows) - 1, 0))
    inside = (rows[position] == items) if len(rows) else np.zeros(len(items), dtype=bool)
    pairs = np.unique(users[inside] * max(len(rows), 1) + position[inside])
    return pairs // max(len(rows), 1), pairs % max(len(rows), 1)


def _symmetric_noise(generator: np.random.Generator, std: float, dim: int) -> np.ndarray:
    """Gaussian noise on the upper triangle, mirrored: the release is the triangle."""
    upper = np.triu(generator.normal(0.0, std, (dim, dim)))
    return upper + np.triu(upper, 1).T


def _psd(matrix: np.ndarray) -> np.ndarray:
    """The nearest PSD matrix (negative eigenvalues set to 0): post-processing of a noisy Gram."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.clip(eigenvalues, 0.0, None)) @ vectors.T


def solve_private_items(
    releases: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]], num_users: int, config: IALSConfig
) -> ItemFactors:
    """The server's item step from the markets' releases (module docstring); items no market sells stay zero.

    Parameters
    ----------
    releases : Sequence[tuple[np.ndarray, dict[str, np.ndarray]]]
        Per market its assortment rows and :func:`private_release`'s arrays.
    num_users : int
        Users of the replying markets (public): |U| of the frequency-scaled regularisation.
    config : IALSConfig
        λ, α and ν (the confidence is binary under DP).
    """
    if not releases:
        raise ValueError("The item step needs the release of at least one market.")
    rows = np.unique(np.concatenate([np.asarray(market_rows, dtype=np.int64) for market_rows, _ in releases]))
    dim = config.factors
    sums, counts = np.zeros((len(rows), dim)), np.zeros(len(rows))
    gram, interaction_gram = np.zeros((dim, dim)), np.zeros((dim, dim))
    for market_rows, arrays in releases:
        position = np.searchsorted(rows, np.asarray(market_rows, dtype=np.int64))
        sums[position] += arrays["sums"]
        counts[position] += arrays["counts"]
        gram += arrays["gram"]
        interaction_gram += arrays["interaction-gram"]
    buyers = np.clip(counts, 0.0, None)
    gram, interaction_gram = _psd(gram), _psd(interaction_gram)
    mean_outer = interaction_gram / max(float(buyers.sum()), 1.0)
    regularization = item_regularization(buyers, num_users, config)
    factors = np.zeros((len(rows), dim))
    identity = np.eye(dim)
    for start in range(0, len(rows), _SOLVE_CHUNK):
        part = slice(start, start + _SOLVE_CHUNK)
        matrices = (
            gram[None]
            + config.alpha * buyers[part, None, None] * mean_outer[None]
            + regularization[part, None, None] * identity[None]
        )
        factors[part] = np.linalg.solve(matrices, (1.0 + config.alpha) * sums[part][..., None])[..., 0]
    return ItemFactors(rows, factors)


def private_release_problem(payload: dict[str, np.ndarray], num_items: int, dim: int) -> str | None:
    """What is wrong with a DP-fedals reply's arrays, or None.

    A reply holds exactly the release's blocks and the assortment: integer rows inside the
    catalog, sorted and distinct; one ``d``-vector of sums and one count per row; ``d × d``
    Grams; float, finite values.
    """
    expected = {*RELEASE_KEYS, ASSORTMENT_KEY}
    if set(payload) != expected:
        missing, extra = sorted(expected - set(payload)), sorted(set(payload) - expected)
        return f"its arrays are not a DP-fedals release: missing {missing}, unexpected {extra}"
    rows = payload[ASSORTMENT_KEY]
    if problem := rows_problem(ASSORTMENT_KEY, rows, num_items):
        return problem
    shapes = {"sums": (len(rows), dim), "counts": (len(rows),), "gram": (dim, dim), "interaction-gram": (dim, dim)}
    for name, shape in shapes.items():
        if payload[name].shape != shape:
            return f"array {name!r} is {payload[name].shape}, not {shape} for {len(rows)} rows of {dim} factors"
        if problem := floats_problem(name, payload[name]):
            return problem
    return None
