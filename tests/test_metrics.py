"""Ranking metrics against hand-computed values."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.metrics import hit_rate_at_k, ndcg_at_k, rank_of_positive


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
