"""The one rule that picks the best round on validation: the first highest score wins.

Every place that keeps "the best round" (or epoch, iteration, candidate, blend weight)
by validation NDCG@10 decides it here: :func:`simulations.results.select_on_validation`
(the round results.json reports), a market's served model
(:func:`clients.served.remember_if_best`, which decides round by round), the
baselines' served models, fedper-ft's fine-tuned fork, fedals-pt's transfer
candidates, the blend weight, a joining market's epoch and the benchmarks that
report a best validation point. A served model's manifest and results.json
describe the same round only because they all apply this one rule.

Ties go to the first (earliest) round, for three reasons:

* it is the only choice both forms of the rule can make alike: a market that
  decides round by round (:func:`improves`) never knows whether a later round
  will tie, and the batch form (:func:`best_index`) must pick what it picked;
* an incremental keeper replaces its kept model only on a strict improvement,
  so a tie costs no copy and no write;
* the earlier round reached the same validation score with less training and,
  under differential privacy, with less of the budget spent.

A NaN score is handled as Python's ``max`` handles it, since every form is built
on the same strict ``>``: a NaN first score stays the best (nothing compares
greater than NaN) and a later NaN never replaces the best. The evaluation never
produces one (:func:`common.data.metrics.ndcg_at_k` is a mean of finite gains),
and ``history.json`` leaves non-finite metrics out.
"""

from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["best_by", "best_index", "improves"]

T = TypeVar("T")


def improves(score: float, best: float | None) -> bool:
    """Whether ``score`` replaces the best so far: the incremental form of the rule.

    Parameters
    ----------
    score : float
        The validation score of the round just evaluated.
    best : float or None
        The score of the best round kept so far; None before the first round.

    Returns
    -------
    bool
        True when there is no best yet or ``score`` is strictly greater: a tie
        keeps the earlier round. Offering the rounds in order and keeping each
        one this accepts ends on the round :func:`best_index` picks.
    """
    return best is None or score > best


def best_index(scores: Iterable[float]) -> int:
    """The index of the first highest score: the batch form of the rule.

    Parameters
    ----------
    scores : Iterable[float]
        Validation scores in round order (earliest first).

    Returns
    -------
    int
        The position of the first score no later one is strictly greater than;
        the same as offering the scores in order to :func:`improves`.

    Raises
    ------
    ValueError
        If ``scores`` is empty.
    """
    index, best = -1, None
    for position, score in enumerate(scores):
        if improves(score, best):
            index, best = position, score
    if index < 0:
        raise ValueError("Choosing the best round on validation needs at least one score.")
    return index


def best_by(items: Iterable[T], score: Callable[[T], float]) -> T:
    """The first of ``items`` (rounds, candidates, ...) with the highest ``score``.

    Parameters
    ----------
    items : Iterable[T]
        What to choose from, in order (earliest first): a tie keeps the earlier one.
    score : Callable[[T], float]
        An item's validation score.

    Returns
    -------
    T
        ``items[best_index(map(score, items))]``.

    Raises
    ------
    ValueError
        If ``items`` is empty.
    """
    items = list(items)
    return items[best_index(score(item) for item in items)]
