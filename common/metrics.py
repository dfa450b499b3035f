"""Ranking metrics for leave-one-out evaluation against sampled negatives."""

import numpy as np


def rank_of_positive(scores: np.ndarray) -> np.ndarray:
    """Rank of the held-out item among its candidates, 0 being the top.

    Parameters
    ----------
    scores : np.ndarray
        Shape ``(users, candidates)``; column 0 scores the held-out positive and
        the other columns score the sampled negatives.

    Returns
    -------
    np.ndarray
        Integer rank per row. A negative scoring equal to the positive counts as
        ranked above it, so a model that scores everything alike earns nothing.
        A NaN score ranks last: a broken model (NaN everywhere) earns nothing
        rather than a perfect score.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"Scores must have shape (users, candidates) with at least 2 candidates, "
            f"got {scores.shape}."
        )
    scores = np.where(np.isnan(scores), -np.inf, scores)
    return (scores[:, 1:] >= scores[:, :1]).sum(axis=1)


def hit_rate_at_k(ranks: np.ndarray, k: int = 10) -> float:
    """Share of users whose held-out item ranks within the top ``k``."""
    if len(ranks) == 0:
        raise ValueError("Hit rate needs at least one ranked user.")
    return float(np.mean(ranks < k))


def ndcg_at_k(ranks: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k with one relevant item per user: ``1 / log2(rank + 2)`` in the top k."""
    if len(ranks) == 0:
        raise ValueError("NDCG needs at least one ranked user.")
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(np.mean(gains))
