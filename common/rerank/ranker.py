"""A market's learned ranker over its candidate lists: LightGBM's LambdaRank, trained on validation lists.

Each market trains its own ranker (nothing is pooled across markets) on its validation lists: one
group of 100 candidates per evaluated user (the held-out item, label 1, and its 99 sampled
negatives, label 0), each described by :mod:`common.rerank.features`. Boosting starts from
fedals' scores (a base margin, :func:`base_scale`): the trees learn what to add to them. A seeded share of the
validation users is held out: boosting stops early on their NDCG@10, and the ranker is kept only
if it beats fedals' own order on them (:func:`common.selection.improves`); otherwise the market
keeps fedals' order. The kept ranker is then refit on every validation user with the number of
trees early stopping chose. The test lists are never seen.

LambdaRank (Burges, "From RankNet to LambdaRank to LambdaMART", MSR-TR-2010-82) is LightGBM's,
not hand-written: a gradient-boosted ranker optimising NDCG directly is what the task needs and
LightGBM's is deterministic under a fixed seed with ``deterministic=True`` and a fixed thread count.
It is trained through LightGBM's core API (``lightgbm.train``, objective ``lambdarank``) with the
parameters ``LGBMRanker`` would pass: the scikit-learn wrapper adds nothing here but a dependency on
scikit-learn, which a region serving the model should not need.
"""

from dataclasses import dataclass

import lightgbm
import numpy as np

from common.data.metrics import hit_rate_at_k, ndcg_at_k, rank_of_positive
from common.rerank.features import FEATURE_GROUPS, FEATURE_NAMES
from common.selection import improves

K = 10  # NDCG@K: the cut-off the ranker optimises and is judged by, the project's metric's


@dataclass(frozen=True)
class RankerConfig:
    """Settings of a market's ranker."""

    holdout: float = 0.2  # share of validation users held out for early stopping and the fallback check
    learning_rate: float = 0.05  # shrinkage of each tree
    max_trees: int = 400  # boosting rounds at most; early stopping usually ends sooner
    stopping_rounds: int = 40  # rounds without a better held-out NDCG@10 before stopping
    num_leaves: int = 15  # leaves per tree: small, markets have 239 to a few thousand lists
    min_child_samples: int = 100  # candidates per leaf at least: a guard against fitting a few users
    reg_lambda: float = 1.0  # L2 penalty on leaf values
    refit: bool = True  # a kept ranker is refit on every validation user with the chosen number of trees
    num_threads: int = 1  # LightGBM's threads; with deterministic=True the result does not depend on it
    seed: int = 0  # the held-out users and LightGBM's seed

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValueError(f"The held-out share of validation users must lie in (0, 1), got {self.holdout}.")
        if self.learning_rate <= 0 or self.max_trees < 1 or self.stopping_rounds < 1:
            raise ValueError(
                f"The ranker needs learning_rate > 0, max_trees >= 1 and stopping_rounds >= 1, got "
                f"{self.learning_rate}, {self.max_trees} and {self.stopping_rounds}."
            )
        if self.num_leaves < 2 or self.min_child_samples < 1 or self.reg_lambda < 0 or self.num_threads < 1:
            raise ValueError(
                f"The ranker needs num_leaves >= 2, min_child_samples >= 1, reg_lambda >= 0 and num_threads >= 1, "
                f"got {self.num_leaves}, {self.min_child_samples}, {self.reg_lambda} and {self.num_threads}."
            )


@dataclass(frozen=True)
class Ranked:
    """NDCG@10 and HR@10 of candidate lists whose column 0 is the held-out item."""

    ndcg: float
    hit_rate: float
    users: int


def ranked(scores: np.ndarray) -> Ranked:
    """NDCG@10 and HR@10 of ``scores`` ``(users, candidates)``, column 0 the held-out item (ties count against it)."""
    ranks = rank_of_positive(np.asarray(scores, dtype=np.float64))
    return Ranked(ndcg_at_k(ranks, K), hit_rate_at_k(ranks, K), len(ranks))


@dataclass(frozen=True)
class RankerFit:
    """A market's ranker, or fedals' order where the ranker did not beat it on held-out validation users."""

    model: str | None  # the LightGBM model as text; None: fedals' order is kept
    features: tuple[str, ...]  # the features it reads, in order, among FEATURE_NAMES
    base_scale: float  # the ranker's score is base_scale x fedals' score plus the trees' (its base margin)
    trees: int  # trees early stopping chose (0 when no ranker could be trained)
    holdout: Ranked  # the ranker trained without them on the held-out validation users
    holdout_fedals: Ranked  # fedals' order on the same users
    importance: dict[str, float]  # total gain of each feature in the served ranker (empty when none is served)

    @property
    def fallback(self) -> bool:
        """Whether the market keeps fedals' order."""
        return self.model is None

    def booster(self) -> lightgbm.Booster | None:
        """The ranker parsed once, for many calls of :meth:`scores`; None where fedals' order is kept."""
        return None if self.model is None else lightgbm.Booster(model_str=self.model)

    def scores(self, features: np.ndarray, num_threads: int = 1, booster: lightgbm.Booster | None = None) -> np.ndarray:
        """Scores ``(users, candidates)`` of lists with ``features`` ``(users, candidates, len(FEATURE_NAMES))``.

        fedals' score where the market kept fedals' order, else the ranker's. ``booster`` is
        :meth:`booster`'s result, saving a parse of the model text per call.
        """
        if features.ndim != 3 or features.shape[2] != len(FEATURE_NAMES):
            raise ValueError(f"List features must be (users, candidates, {len(FEATURE_NAMES)}), got {features.shape}.")
        score = features[:, :, FEATURE_NAMES.index("fedals-score")]
        if self.model is None:
            return score
        booster = self.booster() if booster is None else booster
        return predict(booster, _columns(features, self.features), num_threads) + self.base_scale * score


def predict(booster: lightgbm.Booster, features: np.ndarray, num_threads: int = 1) -> np.ndarray:
    """``booster``'s raw scores ``(users, candidates)`` of lists with ``features`` ``(users, candidates, f)``
    (without the base margin)."""
    users, candidates, width = features.shape
    flat = booster.predict(features.reshape(users * candidates, width), num_threads=num_threads)
    return np.asarray(flat, dtype=np.float64).reshape(users, candidates)


def base_scale(scores: np.ndarray) -> float:
    """The scale of fedals' scores in the ranker's base margin: one over their mean spread within a list.

    Boosting starts from fedals' order rather than from nothing: trees are piecewise constant and
    would otherwise tie candidates fedals tells apart (and a tie counts against the held-out item).
    Scaled to a unit spread, fedals' differences weigh in LambdaRank's logistic loss as much in
    every market, whatever the size of its factors.
    """
    spread = float(np.mean(np.std(scores, axis=1)))
    return 1.0 / spread if spread > 0 else 1.0


def fit_ranker(features: np.ndarray, config: RankerConfig, use: tuple[str, ...] = FEATURE_NAMES) -> RankerFit:
    """Train a market's ranker on its validation lists, judged against fedals' order on held-out users.

    Parameters
    ----------
    features : np.ndarray
        ``(users, candidates, len(FEATURE_NAMES))`` the features of the market's validation lists,
        column 0 of each list the held-out item.
    config : RankerConfig
        The ranker's settings.
    use : tuple[str, ...]
        The features the ranker reads (an ablation leaves groups out); fedals' score is always kept.

    Raises
    ------
    ValueError
        If fewer than two lists are given, the features have the wrong shape, or ``use`` names an
        unknown feature or leaves out fedals' score.
    """
    if features.ndim != 3 or features.shape[2] != len(FEATURE_NAMES) or features.shape[1] < 2:
        raise ValueError(
            f"Validation features must be (users, candidates >= 2, {len(FEATURE_NAMES)}), got {features.shape}."
        )
    unknown = sorted(set(use) - set(FEATURE_NAMES))
    if unknown or "fedals-score" not in use:
        raise ValueError(f"A ranker reads fedals-score and features among {FEATURE_NAMES}; got {use}.")
    users, candidates = features.shape[:2]
    if users < 2:
        raise ValueError(f"A ranker needs at least two validation lists, got {users}.")
    use = tuple(name for name in FEATURE_NAMES if name in use)
    held = np.zeros(users, dtype=bool)
    count = min(users - 1, max(1, round(config.holdout * users)))
    held[np.random.default_rng(config.seed).permutation(users)[:count]] = True
    fedals = ranked(features[held, :, FEATURE_NAMES.index("fedals-score")])
    X = _columns(features, use)
    scale = base_scale(features[~held, :, FEATURE_NAMES.index("fedals-score")])
    margin = scale * features[:, :, FEATURE_NAMES.index("fedals-score")]
    train = _dataset(X[~held], margin[~held], use, seed=config.seed)
    stopped = lightgbm.train(
        _params(config),
        train,
        num_boost_round=config.max_trees,
        valid_sets=[_dataset(X[held], margin[held], use, reference=train, seed=config.seed + 1)],
        callbacks=[lightgbm.early_stopping(config.stopping_rounds, verbose=False)],
    )
    trees = int(stopped.best_iteration or config.max_trees)
    booster = lightgbm.Booster(model_str=stopped.model_to_string(num_iteration=trees))
    holdout = ranked(predict(booster, X[held], config.num_threads) + margin[held])
    if not improves(holdout.ndcg, fedals.ndcg):
        return RankerFit(None, use, scale, trees, holdout, fedals, {})
    if config.refit:
        booster = lightgbm.train(_params(config), _dataset(X, margin, use, seed=config.seed), num_boost_round=trees)
    gains = booster.feature_importance(importance_type="gain")
    importance = {name: float(gain) for name, gain in zip(use, gains, strict=True)}
    return RankerFit(booster.model_to_string(), use, scale, trees, holdout, fedals, importance)


def ablation(valid: np.ndarray, test: np.ndarray, config: RankerConfig) -> dict[str, dict[str, float | int | bool]]:
    """What each feature group adds: the ranker without it, and with fedals' features alone.

    Each variant is trained as :func:`fit_ranker` trains the served one (its own fallback
    included); for each, its held-out validation NDCG@10, test NDCG@10 with its fallback applied,
    and whether it fell back.

    Parameters
    ----------
    valid, test : np.ndarray
        ``(users, candidates, len(FEATURE_NAMES))`` the market's validation and test list features.
    config : RankerConfig
        The ranker's settings.
    """
    variants = {
        f"without {group}": tuple(n for n in FEATURE_NAMES if n not in names)
        for group, names in FEATURE_GROUPS.items()
        if group != "retrieval"
    }
    variants["retrieval only"] = FEATURE_GROUPS["retrieval"]
    report: dict[str, dict[str, float | int | bool]] = {}
    for name, use in variants.items():
        fit = fit_ranker(valid, config, use)
        report[name] = {
            "holdout-ndcg@10": fit.holdout.ndcg,
            "test-ndcg@10": ranked(fit.scores(test, config.num_threads)).ndcg,
            "fallback": fit.fallback,
            "trees": fit.trees,
        }
    return report


def _params(config: RankerConfig) -> dict[str, object]:
    """LightGBM's parameters of the ranker: LGBMRanker's (objective lambdarank), through the core API."""
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [K],
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_child_samples": config.min_child_samples,
        "reg_lambda": config.reg_lambda,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": config.num_threads,
        "verbose": -1,
    }


def _dataset(
    features: np.ndarray,
    margin: np.ndarray,
    names: tuple[str, ...],
    reference: lightgbm.Dataset | None = None,
    seed: int = 0,
) -> lightgbm.Dataset:
    """Lists ``(users, candidates, f)`` as a LightGBM data set: one group per user, label 1 for column 0,
    boosting from ``margin`` ``(users, candidates)``. The features are named ``names`` in the model's
    text, so that a served ranker is checked against the features the code computes.

    Each list goes in its own order, drawn from ``seed``: LightGBM sorts tied scores stably, so a
    held-out item always first would win every tie, in the lambdarank gradients and in the NDCG
    early stopping reads (fedals scores every item without a published factor 0: large ties).
    """
    users, candidates = features.shape[:2]
    order = np.argsort(np.random.default_rng(seed).random((users, candidates)), axis=1)
    rows = np.arange(users)[:, None]
    return lightgbm.Dataset(
        _flat(features[rows, order]),
        label=_labels(users, candidates).reshape(users, candidates)[rows, order].ravel(),
        group=np.full(users, candidates),
        init_score=margin[rows, order].ravel(),
        feature_name=list(names),
        reference=reference,
        free_raw_data=False,
    )


def _columns(features: np.ndarray, use: tuple[str, ...]) -> np.ndarray:
    return features[:, :, [FEATURE_NAMES.index(name) for name in use]]


def _flat(features: np.ndarray) -> np.ndarray:
    return features.reshape(-1, features.shape[2])


def _labels(users: int, candidates: int) -> np.ndarray:
    labels = np.zeros((users, candidates), dtype=np.int64)
    labels[:, 0] = 1
    return labels.ravel()
