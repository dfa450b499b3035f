"""Private transfer: a market refits its own data, without noise, on the shared item factors it received.

Under DP every array a market sends is (ε, δ)-DP for its users, and so is the shared item table
the server solves from them. The model a market serves its own users is never sent, and the
market holds its data anyway, so that model may use the data without noise, exactly as a
market that trains alone does (the inter-silo threat model, ``docs/threat-model.md``).

After the last round the market fits candidates on its own training interactions and keeps the
one best on its own validation split:

* ``shared``: the received item factors as they are, users solved on them (what fedals serves);
* ``own``: iALS on the market's data alone, from the seeded initial factors, with nothing of the
  shared table: going alone, so that the choice is never worse than that on validation;
* ``prior-μ``: iALS on the market's data started from the shared factors, each item step pulled
  toward them with weight μ (:func:`solve_items_toward`): an item the market's users rarely buy
  keeps what the federation learned of it, one they buy often follows them.

Nothing of a fit leaves the market: the candidates are built after the last reply, from the
received table and local data only.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.ials.core import IALSConfig, ItemFactors, initial_item_factors_table
from common.ials.model import IALSMarket, evaluate_market
from common.ials.steps import solve_items_toward, solve_users
from common.neural.model import SplitRecommender
from common.neural.train import RankingMetrics
from common.selection import best_by

PRIOR_WEIGHTS = (
    1.0,
    10.0,
    100.0,
)  # μ of the prior-μ candidates: from "the market's data decides" to "the shared table does"
REFIT_ITERATIONS = 5  # ALS iterations of a refit from the shared factors (a warm start converges in a few)
SHARED, OWN = "shared", "own"


def refit(
    market: IALSMarket,
    start: ItemFactors,
    prior_weight: float,
    config: IALSConfig,
    iterations: int,
) -> ItemFactors:
    """``iterations`` ALS iterations on the market's training data from ``start``, each pulled toward ``start``.

    The fit's table is the market's own, so |I| of its user solves is that table's rows with a factor.
    """
    items = start
    for _ in range(iterations):
        users = solve_users(market.train, items, items.gram(), items.held_rows(), config)
        items = solve_items_toward(market.train, users, start, prior_weight, config)
    return items


@dataclass(frozen=True)
class Candidate:
    """One fit of the market, evaluated: its validation and test metrics and the model to serve."""

    name: str
    valid: RankingMetrics
    test: RankingMetrics
    model: SplitRecommender


@dataclass(frozen=True)
class TransferChoice:
    """The candidate the market serves and what every candidate scored on validation."""

    chosen: Candidate
    validation: dict[str, float]  # candidate name -> validation NDCG@10


def candidates(
    market: IALSMarket,
    shared: ItemFactors,
    shared_gram: np.ndarray,
    num_items: int,
    config: IALSConfig,
    prior_weights: Sequence[float] = PRIOR_WEIGHTS,
    refit_iterations: int = REFIT_ITERATIONS,
    *,
    shared_rows: int,
) -> list[Candidate]:
    """Every candidate of the module docstring, evaluated on the market's validation and test splits.

    Parameters
    ----------
    market : IALSMarket
        The market.
    shared : ItemFactors
        The received item factors of the market's assortment.
    shared_gram : np.ndarray
        ``(d, d)`` the Gram the server sent with them (over the whole shared table).
    num_items : int
        Rows of the item table (the catalog's).
    config : IALSConfig
        fedals' settings; ``config.iterations`` is the ``own`` fit's iterations.
    prior_weights : Sequence[float]
        μ of the ``prior-μ`` candidates.
    refit_iterations : int
        Iterations of each ``prior-μ`` refit.
    shared_rows : int
        Rows of the shared table with a factor, as the server sent it with ``shared_gram``.
    """
    own = refit(market, initial_item_factors_table(shared.rows, config), 0.0, config, config.iterations)
    fits = [(OWN, own, own.gram(), own.held_rows()), (SHARED, shared, shared_gram, shared_rows)]
    for weight in prior_weights:
        fitted = refit(market, shared, weight, config, refit_iterations)
        fits.append((f"prior-{weight:g}", fitted, fitted.gram(), fitted.held_rows()))
    evaluated = []
    for name, items, gram, rows in fits:
        valid, test, model = evaluate_market(market, items, gram, num_items, config, item_rows=rows)
        evaluated.append(Candidate(name, valid, test, model))
    return evaluated


def choose(evaluated: Sequence[Candidate]) -> TransferChoice:
    """The candidate best on validation NDCG@10; a tie keeps the earlier one (``own`` before the refits).

    Test metrics are never looked at.
    """
    if not evaluated:
        raise ValueError("Private transfer needs at least one candidate to choose from.")
    best = best_by(evaluated, lambda candidate: candidate.valid.ndcg)
    return TransferChoice(best, {candidate.name: candidate.valid.ndcg for candidate in evaluated})
