"""Ranking metrics for leave-one-out evaluation.

Two protocols rank each user's held-out item: against 99 sampled negatives
(:func:`rank_of_positive`, the published XMarket protocol) and against the
market's whole assortment minus what the user already interacted with
(:func:`full_rank_of_positive`). NDCG@k and hit rate@k take the ranks of
either; with one relevant item per user, recall@k is the hit rate.
"""

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
        raise ValueError(f"Scores must have shape (users, candidates) with at least 2 candidates, got {scores.shape}.")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    return (scores[:, 1:] >= scores[:, :1]).sum(axis=1)


def full_rank_of_positive(scores: np.ndarray, positives: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Rank of the held-out item among a market's whole assortment, 0 being the top.

    The full-ranking counterpart of :func:`rank_of_positive`: instead of 99
    sampled negatives, every item the market sells is a candidate except the
    ones the user already interacted with (``excluded``). Sampled metrics can
    order methods differently from full ranking (Krichene and Rendle, KDD 2020).

    Parameters
    ----------
    scores : np.ndarray
        Shape ``(users, items)``: each user's score of every item of the assortment.
    positives : np.ndarray
        Shape ``(users,)``: the column of each user's held-out item.
    excluded : np.ndarray
        Shape ``(users, m)`` of integer columns left out of the ranking (the
        user's training items; at test time the validation item too), padded
        with -1 (any negative entry is padding); ``m`` may be 0 and a column may repeat. The held-out item
        itself is never left out, even if listed (two item IDs hashed to one
        overflow row can make a training item and the held-out item one column).

    Returns
    -------
    np.ndarray
        Integer rank per row: the number of candidates, other than the held-out
        item, scoring at least as high as it. As in :func:`rank_of_positive`,
        ties count against the positive and a NaN score ranks last.
    """
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"Scores must have shape (users, items) with at least 1 item, got {scores.shape}.")
    users, items = scores.shape
    positives = np.asarray(positives)
    excluded = np.asarray(excluded)
    if positives.shape != (users,):
        raise ValueError(f"Positives must have shape ({users},) to match the scores, got {positives.shape}.")
    if excluded.ndim != 2 or excluded.shape[0] != users:
        raise ValueError(f"Excluded items must have shape ({users}, m) to match the scores, got {excluded.shape}.")
    if users and (positives.min() < 0 or positives.max() >= items):
        raise ValueError(f"Positive columns must lie in [0, {items}), got {positives.min()}..{positives.max()}.")
    if excluded.size and excluded.max() >= items:
        raise ValueError(f"Excluded columns must lie below {items}, got {excluded.max()}.")
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    rows = np.arange(users)
    above = scores >= scores[rows, positives][:, None]
    listed = excluded >= 0
    above[np.broadcast_to(rows[:, None], excluded.shape)[listed], excluded[listed]] = False
    above[rows, positives] = False
    return above.sum(axis=1)


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
