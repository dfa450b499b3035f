"""common.selection: the first round with the highest validation NDCG@10 wins, decided at once or round by round."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.selection import best_by, best_index, improves
from simulations.results import select_on_validation

NAN = math.nan


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([0.4], 0),  # a single round is the best
        ([0.1, 0.3, 0.2], 1),
        ([0.2, 0.5, 0.5, 0.1], 1),  # a tie goes to the earlier round
        ([0.3, 0.3, 0.3], 0),
        ([0.1, 0.2, 0.2, 0.3, 0.3], 3),
        ([0.0, 0.0], 0),
        ([NAN, 0.9], 0),  # as max(): nothing is greater than a NaN first score...
        ([0.5, NAN, 0.7], 2),  # ...and a later NaN never replaces the best
        ([0.5, NAN], 0),
        ([NAN, NAN], 0),
    ],
)
def test_best_index_is_the_first_highest_score(scores, expected):
    assert best_index(scores) == expected
    assert best_index(iter(scores)) == expected  # any iterable, consumed once


def test_no_score_has_no_best_round():
    with pytest.raises(ValueError, match="at least one score"):
        best_index([])
    with pytest.raises(ValueError, match="at least one score"):
        best_by([], float)


@pytest.mark.parametrize(
    "score, best, expected",
    [
        (0.1, None, True),  # the first round is always kept
        (NAN, None, True),
        (0.3, 0.2, True),
        (0.2, 0.2, False),  # a tie keeps the earlier round
        (0.1, 0.2, False),
        (NAN, 0.2, False),
        (0.9, NAN, False),
    ],
)
def test_improves_only_on_a_strictly_greater_score(score, best, expected):
    assert improves(score, best) is expected


def test_best_by_returns_the_item_not_its_index():
    rounds = [{"round": 1, "val-ndcg": 0.2}, {"round": 2, "val-ndcg": 0.4}, {"round": 3, "val-ndcg": 0.4}]

    assert best_by(rounds, lambda point: point["val-ndcg"])["round"] == 2
    assert best_by({3: 0.1, 1: 0.5, 2: 0.5}, {3: 0.1, 1: 0.5, 2: 0.5}.get) == 1  # a dict's keys, in its order


def test_results_select_the_first_best_trained_round():
    curve = [
        {"round": 0, "val-ndcg": 0.9},  # the starting point is never selected
        {"round": 1, "val-ndcg": 0.3},
        {"round": 2, "val-ndcg": 0.5},
        {"round": 3, "val-ndcg": 0.5},
    ]

    assert select_on_validation(curve)["round"] == 2


def _keep_round_by_round(scores):
    """The round a keeper like clients.served.remember_if_best ends on, offered one round at a time."""
    kept, best = None, None
    for position, score in enumerate(scores):
        if improves(score, best):
            kept, best = position, score
    return kept


# Few distinct values, so that ties are common; NaN among them.
tied_scores = st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.25000000000000006, 0.5, 1.0, NAN]), min_size=1, max_size=30)


@given(tied_scores)
def test_deciding_round_by_round_ends_on_the_batch_choice(scores):
    chosen = best_index(scores)

    assert _keep_round_by_round(scores) == chosen
    # The rule results.json always used: max() keeps the first of equal points.
    assert chosen == max(range(len(scores)), key=scores.__getitem__)
    finite = [score for score in scores if not math.isnan(score)]
    if not math.isnan(scores[0]):
        assert scores[chosen] == max(finite)
        assert all(score < scores[chosen] for score in scores[:chosen] if not math.isnan(score))


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=30))
def test_any_validation_scores_agree_round_by_round_and_at_once(scores):
    assert _keep_round_by_round(scores) == best_index(scores) == scores.index(max(scores))
