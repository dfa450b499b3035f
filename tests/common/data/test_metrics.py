"""Ranking metrics against hand-computed values, sampled and full-assortment."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.data.metrics import full_rank_of_positive, hit_rate_at_k, ndcg_at_k, rank_of_positive


def test_rank_counts_negatives_scoring_at_least_the_positive():
    # Prepare: positive in column 0; ties count against the positive.
    scores = np.array([[0.9, 0.1, 0.2], [0.5, 0.7, 0.5], [0.0, 0.0, 0.0]])

    # Execute
    ranks = rank_of_positive(scores)

    # Assert
    assert ranks.tolist() == [0, 2, 2]


def test_a_nan_score_ranks_last():
    # Prepare: a NaN positive must not win (a model broken by NaN arrays once
    # scored validation NDCG 1.0); a NaN negative must not beat a real positive.
    scores = np.array([[np.nan, 0.1, 0.2], [0.5, np.nan, 0.7], [np.nan, np.nan, np.nan]])

    # Execute
    ranks = rank_of_positive(scores)

    # Assert
    assert ranks.tolist() == [2, 1, 2]


def test_ndcg_and_hit_rate_of_hand_computed_ranks():
    # Prepare: ranks 0, 1, 9 are in the top 10; rank 10 is not.
    ranks = np.array([0, 1, 9, 10])

    # Execute
    ndcg = ndcg_at_k(ranks, 10)
    hit_rate = hit_rate_at_k(ranks, 10)

    # Assert: gains 1, 1/log2(3), 1/log2(11), 0.
    expected = (1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(11) + 0.0) / 4
    assert ndcg == pytest.approx(expected)
    assert hit_rate == pytest.approx(0.75)


def test_constant_scores_earn_nothing():
    scores = np.ones((5, 100))

    ranks = rank_of_positive(scores)

    assert ndcg_at_k(ranks) == 0.0
    assert hit_rate_at_k(ranks) == 0.0


def test_metrics_refuse_empty_input():
    with pytest.raises(ValueError, match="at least one"):
        ndcg_at_k(np.array([], dtype=int))
    with pytest.raises(ValueError, match="shape"):
        rank_of_positive(np.ones(3))


@given(arrays(np.int64, st.integers(1, 50), elements=st.integers(0, 99)), st.integers(1, 20))
def test_ndcg_is_bounded_by_hit_rate(ranks, k):
    ndcg = ndcg_at_k(ranks, k)
    hit_rate = hit_rate_at_k(ranks, k)

    assert 0.0 <= ndcg <= hit_rate <= 1.0


def test_full_rank_counts_every_item_not_excluded_scoring_at_least_the_positive():
    # Prepare: 6 items; user 0 holds out column 2 (score 0.5), has trained on
    # columns 0 and 4 (scores 0.9 and 0.8, left out); column 5 ties (counts).
    # User 1 holds out column 0, the top score, with no exclusions.
    scores = np.array([[0.9, 0.1, 0.5, 0.7, 0.8, 0.5], [0.9, 0.3, 0.2, 0.1, 0.0, 0.4]])
    positives = np.array([2, 0])
    excluded = np.array([[0, 4], [-1, -1]])

    # Execute
    ranks = full_rank_of_positive(scores, positives, excluded)

    # Assert: user 0 is beaten by column 3 and tied by column 5.
    assert ranks.tolist() == [2, 0]


def test_full_rank_never_excludes_the_held_out_item_itself():
    # Prepare: the positive is listed among the exclusions (an overflow-hash
    # collision) and repeated exclusions appear; neither changes the count.
    scores = np.array([[0.2, 0.6, 0.4, 0.1]])

    # Execute
    ranks = full_rank_of_positive(scores, np.array([2]), np.array([[2, 1, 1, -1]]))

    # Assert: only column 1 is excluded, nothing else beats 0.4.
    assert ranks.tolist() == [0]


def test_full_rank_puts_a_nan_score_last():
    # Prepare: a NaN positive ranks below every candidate; a NaN candidate
    # ranks below a real positive; excluded items never count.
    scores = np.array([[np.nan, 0.1, 0.2, 0.3], [0.5, np.nan, 0.7, 0.1], [np.nan] * 4])
    excluded = np.array([[3], [-1], [1]])

    # Execute
    ranks = full_rank_of_positive(scores, np.array([0, 0, 0]), excluded)

    # Assert: 2 of 3 candidates left for user 0; column 2 only for user 1; 2 left for user 2.
    assert ranks.tolist() == [2, 1, 2]


def test_full_ndcg_and_recall_of_a_hand_computed_case():
    # Prepare: 12 items, one user; 10 items outscore the positive, 3 of them trained on.
    scores = np.array([[*np.linspace(1.0, 0.9, 10), 0.5, 0.0]])

    # Execute
    without = full_rank_of_positive(scores, np.array([10]), np.zeros((1, 0), dtype=int))
    with_exclusions = full_rank_of_positive(scores, np.array([10]), np.array([[0, 1, 2]]))

    # Assert: rank 10 misses the top 10; rank 7 earns 1 / log2(9).
    assert without.tolist() == [10]
    assert (ndcg_at_k(without), hit_rate_at_k(without)) == (0.0, 0.0)
    assert with_exclusions.tolist() == [7]
    assert ndcg_at_k(with_exclusions) == pytest.approx(1.0 / math.log2(9))
    assert hit_rate_at_k(with_exclusions) == 1.0


def test_full_rank_refuses_mismatched_shapes_and_columns():
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="Positives"):
        full_rank_of_positive(scores, np.array([0]), np.zeros((2, 0), dtype=int))
    with pytest.raises(ValueError, match="Excluded"):
        full_rank_of_positive(scores, np.array([0, 1]), np.zeros((3, 1), dtype=int))
    with pytest.raises(ValueError, match="Positive columns"):
        full_rank_of_positive(scores, np.array([0, 3]), np.zeros((2, 0), dtype=int))
    with pytest.raises(ValueError, match="Excluded columns"):
        full_rank_of_positive(scores, np.array([0, 1]), np.array([[3], [0]]))


# Scores with ties and NaNs: a few distinct values make ties common.
_scores = st.one_of(st.sampled_from([0.0, 0.5, 1.0, np.nan]), st.floats(-3, 3))


@st.composite
def _full_ranking_case(draw):
    """One user's scores over an assortment, the held-out column, exclusions and a
    sample of negatives drawn from the items neither held out nor excluded."""
    items = draw(st.integers(2, 40))
    scores = np.array(draw(st.lists(_scores, min_size=items, max_size=items)))
    positive = draw(st.integers(0, items - 1))
    others = [column for column in range(items) if column != positive]
    excluded = draw(st.lists(st.sampled_from(others), max_size=len(others), unique=True))
    candidates = [column for column in others if column not in excluded]
    negatives = draw(st.lists(st.sampled_from(candidates), min_size=1, unique=True)) if candidates else []
    return scores, positive, excluded, candidates, negatives


@given(_full_ranking_case())
def test_full_rank_is_at_least_the_rank_among_a_subset_of_its_candidates(case):
    # Sampled negatives drawn from the full ranking's candidates can only rank
    # the positive higher (Krichene and Rendle, KDD 2020): full rank >= sampled rank.
    scores, positive, excluded, _, negatives = case
    full = full_rank_of_positive(scores[None, :], np.array([positive]), np.array([excluded], dtype=int).reshape(1, -1))
    if negatives:
        sampled = rank_of_positive(scores[None, [positive, *negatives]])
        assert full[0] >= sampled[0]


@given(_full_ranking_case())
def test_full_rank_equals_the_sampled_rank_over_all_its_candidates(case):
    # With every candidate as a "negative" the two protocols agree exactly, and
    # the rank stays within the number of candidates.
    scores, positive, excluded, candidates, _ = case

    full = full_rank_of_positive(scores[None, :], np.array([positive]), np.array([excluded], dtype=int).reshape(1, -1))

    assert 0 <= full[0] <= len(candidates)
    if candidates:
        assert full[0] == rank_of_positive(scores[None, [positive, *candidates]])[0]
    else:
        assert full[0] == 0
