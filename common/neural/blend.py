"""A per-market blend of two split recommenders' scores, its weight chosen on the market's validation split.

The blend of models ``A`` and ``B`` with weight ``w`` scores

    s(u, i) = w · s_A(u, i) / σ_A + (1 − w) · s_B(u, i) / σ_B

where ``σ`` is the standard deviation of a model's scores of the market's validation candidates
(the held-out item and its 99 sampled negatives), so that ``w`` weighs two models whose scores
live on different scales. The blend is itself a :class:`common.model.SplitRecommender` of width
``d_A + d_B`` (:func:`blended_recommender`): its item table holds each item's two encodings side
by side (the tower zero), its history projection is block-diagonal, its item bias and user rows
are the weighted ones. Evaluation, served models, ``recommend`` and ``score`` therefore work on
it unchanged, and a served blend reproduces its reported test metrics exactly.

:func:`choose_blend` takes ``w`` from :data:`BLEND_WEIGHTS` with the best validation NDCG@10
(:func:`common.train.evaluate`), the first of equal ones from ``w = 1`` (model A alone) down, and
reports test at that ``w`` only. Everything it reads is the market's own: nothing leaves it.
"""

from dataclasses import dataclass

import numpy as np
import torch

from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import EVAL_CHUNK, MarketTensors, RankingMetrics, evaluate
from common.selection import best_by

BLEND_WEIGHTS = tuple(round(1.0 - step / 10, 1) for step in range(11))  # w of model A: 1.0, 0.9, ..., 0.0
_ENCODE_CHUNK = 65536  # catalog rows encoded at once


@torch.no_grad()
def validation_score_scale(model: SplitRecommender, data: MarketTensors) -> float:
    """σ: the standard deviation of ``model``'s scores of the market's validation candidates.

    Parameters
    ----------
    model : SplitRecommender
        The model as of validation (users from their training interactions).
    data : MarketTensors
        The market; every validation user's 100 candidates are scored by the model's forward pass.

    Raises
    ------
    ValueError
        If the market has no validation users, or the model scores every candidate alike (σ = 0).
    """
    valid = data.split.valid
    if len(valid.users) == 0:
        raise ValueError(f"Market '{data.split.market}' has no validation users to scale a blend on.")
    model.eval()
    users = torch.as_tensor(valid.users) + data.user_offset
    candidates = torch.as_tensor(valid.candidates)
    scores = []
    for chunk in torch.arange(len(users)).split(EVAL_CHUNK):
        history, mask = data.user_history(users[chunk])
        scores.append(model(users[chunk], history, mask, candidates[chunk]).double().flatten())
    scale = float(torch.cat(scores).std())
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"Market '{data.split.market}': a model scores its validation candidates with spread {scale}; "
            "a blend needs scores that differ."
        )
    return scale


@torch.no_grad()
def blended_recommender(
    first: SplitRecommender, second: SplitRecommender, first_factor: float, second_factor: float
) -> SplitRecommender:
    """The split recommender scoring ``first_factor · s_first + second_factor · s_second`` exactly.

    Parameters
    ----------
    first, second : SplitRecommender
        Two models of one market over one catalog, with the same users and history length.
    first_factor, second_factor : float
        The weights of the two scores (for :func:`choose_blend`, ``w / σ_A`` and ``(1 − w) / σ_B``).

    Returns
    -------
    SplitRecommender
        Width ``d_first + d_second``, with user embeddings if either model has them.

    Raises
    ------
    ValueError
        If the two models differ in catalog rows, users or history length.
    """
    a, b = first.config, second.config
    for name in ("num_items", "num_users", "history_length"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(
                f"Only models of one market over one catalog blend: {name} is {getattr(a, name)} in the first "
                f"model and {getattr(b, name)} in the second."
            )
    user_embeddings = a.user_embeddings or b.user_embeddings
    model = SplitRecommender(ModelConfig(a.num_items, a.num_users, a.dim + b.dim, a.history_length, user_embeddings))
    first.eval()
    second.eval()
    table = model.encoder.item_embedding.weight
    for start in range(0, a.num_items, _ENCODE_CHUNK):
        rows = torch.arange(start, min(start + _ENCODE_CHUNK, a.num_items))
        table[rows, : a.dim] = first.encoder(rows)  # the tower is position-wise: encode each row once
        table[rows, a.dim :] = second.encoder(rows)
    model.encoder.tower.weight.zero_()
    model.encoder.tower.bias.zero_()
    projection = model.head.history_projection.weight
    projection.zero_()
    projection[: a.dim, : a.dim] = first_factor * first.head.history_projection.weight
    projection[a.dim :, a.dim :] = second_factor * second.head.history_projection.weight
    model.head.item_bias.weight.copy_(
        first_factor * first.head.item_bias.weight + second_factor * second.head.item_bias.weight
    )
    if user_embeddings:
        users = model.head.user_embedding.weight
        users.zero_()
        for source, factor, columns in (
            (first, first_factor, slice(0, a.dim)),
            (second, second_factor, slice(a.dim, None)),
        ):
            if source.head.user_embedding is not None:
                users[:, columns] = factor * source.head.user_embedding.weight
    return model.eval()


@dataclass(frozen=True)
class BlendChoice:
    """The blend a market keeps: its weight, scales, metrics and the model as of test."""

    weight: float  # w of the first model
    scales: tuple[float, float]  # σ_A, σ_B
    valid: RankingMetrics
    test: RankingMetrics
    model: SplitRecommender  # the blend with the first model as of test: the model to serve
    curve: tuple[tuple[float, float], ...]  # (w, validation NDCG@10) of every weight tried


def choose_blend(
    first_valid: SplitRecommender,
    first_test: SplitRecommender,
    second: SplitRecommender,
    data: MarketTensors,
    weights: tuple[float, ...] = BLEND_WEIGHTS,
) -> BlendChoice:
    """The market's blend of two models with the weight that is best on its validation split.

    Parameters
    ----------
    first_valid, first_test : SplitRecommender
        Model A as of validation and as of test. They may differ in their user rows: fedals'
        users are solved on the training interactions for validation and folded in with the
        validation interaction for test (:mod:`common.ials.model`). Pass one model twice when
        it is the same for both.
    second : SplitRecommender
        Model B, the same for validation and test (its user vector comes from the history the
        evaluation passes).
    data : MarketTensors
        The market.
    weights : tuple[float, ...]
        The weights ``w`` of model A to try, each in [0, 1]; the first of equal validation
        scores wins, so list the preferred end first.

    Raises
    ------
    ValueError
        If ``weights`` is empty or holds a weight outside [0, 1].
    """
    if not weights or any(not 0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"Blend weights must be a non-empty list of numbers in [0, 1], got {list(weights)}.")
    scales = (validation_score_scale(first_valid, data), validation_score_scale(second, data))

    def factors(w: float) -> tuple[float, float]:
        return w / scales[0], (1.0 - w) / scales[1]

    curve = tuple(
        (w, evaluate(blended_recommender(first_valid, second, *factors(w)), data, full=False).ndcg) for w in weights
    )
    weight = best_by(curve, lambda point: point[1])[0]  # the first of equal points wins
    valid = evaluate(blended_recommender(first_valid, second, *factors(weight)), data)
    model = blended_recommender(first_test, second, *factors(weight))
    return BlendChoice(weight, scales, valid, evaluate(model, data, on_test=True), model, curve)
