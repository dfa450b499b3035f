"""rerank's ranker: LambdaRank per market on validation lists, kept only where it beats fedals' order."""

import numpy as np
import pytest

from common.rerank.features import FEATURE_NAMES
from common.rerank.ranker import RankerConfig, _dataset, ablation, fit_ranker, ranked

CONFIG = RankerConfig(max_trees=30, stopping_rounds=5, min_child_samples=5, learning_rate=0.5)


def _lists(users: int, seed: int, telling: str | None, perfect_score: bool = False) -> np.ndarray:
    """``(users, 20, features)`` lists, column 0 the held-out item; noise, but for the feature ``telling``
    (1 for the held-out item, 0 otherwise) and, with ``perfect_score``, fedals' score (highest for it)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(users, 20, len(FEATURE_NAMES)))
    if telling is not None:
        features[:, :, FEATURE_NAMES.index(telling)] = 0.0
        features[:, 0, FEATURE_NAMES.index(telling)] = 1.0
    if perfect_score:
        features[:, 0, FEATURE_NAMES.index("fedals-score")] = 10.0
    return features


def test_ranked_counts_ties_against_the_held_out_item():
    # Prepare: user 0's held-out item first; user 1's tied with one negative (rank 1); user 2's third.
    scores = np.array([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])

    # Execute
    metrics = ranked(scores)

    # Assert: NDCG@10 is the mean of 1 / log2(rank + 2).
    assert metrics.ndcg == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(4)) / 3)
    assert metrics.hit_rate == 1.0 and metrics.users == 3


def test_a_ranker_that_finds_a_telling_feature_is_kept_and_ranks_test_lists_by_it():
    # Prepare: co-occurrence marks the held-out item; fedals' score is noise.
    valid, test = _lists(200, 0, "co-sum"), _lists(100, 1, "co-sum")

    # Execute
    fit = fit_ranker(valid, CONFIG)

    # Assert
    assert not fit.fallback
    assert fit.holdout.ndcg == 1.0 and fit.holdout_fedals.ndcg < 0.5
    assert fit.holdout.users == 40  # a fifth of 200 validation users held out
    assert ranked(fit.scores(test)).ndcg == 1.0
    assert max(fit.importance, key=fit.importance.get) == "co-sum"


def test_a_market_whose_ranker_does_not_beat_fedals_keeps_fedals_order():
    # Prepare: fedals' score puts every held-out item first; nothing can beat it.
    valid, test = _lists(100, 0, None, perfect_score=True), _lists(50, 1, None)

    # Execute
    fit = fit_ranker(valid, CONFIG)

    # Assert
    assert fit.fallback and fit.model is None and fit.importance == {}
    assert fit.holdout_fedals.ndcg == 1.0
    np.testing.assert_array_equal(fit.scores(test), test[:, :, FEATURE_NAMES.index("fedals-score")])


def test_the_ranker_is_deterministic():
    # Prepare
    valid = _lists(100, 0, "co-max")

    # Execute
    first, second = fit_ranker(valid, CONFIG), fit_ranker(valid, CONFIG)

    # Assert
    assert first.model == second.model and first.model is not None


def test_the_ablation_leaves_each_group_out_and_keeps_fedals_alone():
    # Prepare: recency alone marks the held-out item.
    valid, test = _lists(100, 0, "days-since-last-sale"), _lists(50, 1, "days-since-last-sale")

    # Execute
    report = ablation(valid, test, CONFIG)

    # Assert
    assert report["without recency"]["test-ndcg@10"] < 1.0
    assert report["without cooccurrence"]["test-ndcg@10"] == 1.0
    assert report["retrieval only"]["test-ndcg@10"] < 1.0


def test_bad_settings_and_features_are_refused():
    with pytest.raises(ValueError, match="held-out share"):
        RankerConfig(holdout=1.0)
    with pytest.raises(ValueError, match="fedals-score"):
        fit_ranker(_lists(10, 0, None), CONFIG, use=("co-sum",))
    with pytest.raises(ValueError, match="at least two validation lists"):
        fit_ranker(_lists(1, 0, None), CONFIG)


def test_lightgbm_sees_each_list_in_a_seeded_order_not_the_held_out_item_first():
    # Prepare: 50 lists whose candidates are all tied (fedals scores 0 for every unshared item), where
    # LightGBM's stable sort would let the held-out item, always column 0, win every tie
    features = np.zeros((50, 20, len(FEATURE_NAMES)))
    margin = np.zeros((50, 20))

    # Execute
    labels = _dataset(features, margin, FEATURE_NAMES, seed=3).get_label().reshape(50, 20)
    again = _dataset(features, margin, FEATURE_NAMES, seed=3).get_label().reshape(50, 20)

    # Assert: one held-out item per list, at positions spread over the list, the same for the same seed
    assert (labels.sum(axis=1) == 1).all()
    assert len(set(labels.argmax(axis=1).tolist())) > 10
    np.testing.assert_array_equal(labels, again)
