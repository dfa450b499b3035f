"""The harness's ``blend``: per market, fedals and a neural federated method's scores blended.

After ``fedals`` and a neural method (the first of ``fedavg``, ``fedper``, ``fedrep``,
``fedper-ft`` in ``--methods``) have run, each market blends the two with the weight that is best
on its own validation split (:func:`common.blend.choose_blend`):

* fedals' part is the item table fedals published after its last round
  (``OUT/models/fedals/published.pt``), the market's users solved on it as fedals' markets solve
  them (:mod:`common.ials.model`): on the training interactions for validation, folded in with
  the validation interaction for test. It is the last round, not each market's best validation
  round that fedals serves, because the users of that round need the Gram of its whole table,
  which only the published round keeps. Under fedals' minimum-buyers rule (``als-min-buyers``,
  default 20) the items a market kept to itself are not in that table, so the blend's fedals part
  lacks them (a zero row): it is the shared table alone, below what fedals' markets evaluated;
* the neural part is the method's served model (``OUT/models/<method>/<market>``), its best
  validation round.

The blend is served as one split recommender (``OUT/models/blend/<market>``) that reproduces its
reported test metrics, and it is a candidate of the per-market ``selection``. Nothing leaves a
market for it: each market reads the shared table it was sent anyway and its own data.
"""

import time
from pathlib import Path

import numpy as np

from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_split
from common.ials.core import IALSConfig, ItemFactors
from common.ials.model import ITEM_TABLE, HistoryHead, IALSMarket, history_means, ials_recommender, interaction_ratings
from common.ials.steps import solve_users
from common.methods import METHODS
from common.neural.blend import choose_blend
from common.neural.model import SplitRecommender
from common.serving.format import market_user_ids, write_served_model
from common.serving.published import load_published, published_path
from common.serving.query import load_served_model
from simulations.baselines import Progress, curve_point

BLEND = "blend"
ALS_METHOD = "fedals"


def blend_partner(methods: list[str]) -> str | None:
    """The neural federated method ``blend`` blends fedals with: the first one in ``methods``, or None."""
    return next((m for m in methods if m in METHODS and METHODS[m].family == "sgd"), None)


def ials_models(
    market: IALSMarket, items: ItemFactors, gram: np.ndarray, num_items: int, config: IALSConfig, item_rows: int
) -> tuple[SplitRecommender, SplitRecommender]:
    """fedals' split recommender of ``items`` in ``market`` as of validation and as of test.

    The two differ only in their user rows: users solved on the training interactions, and
    folded in from the training plus the validation interaction (:mod:`common.ials.model`).

    Parameters
    ----------
    market : IALSMarket
        The market.
    items : ItemFactors
        The factors of (at least) the market's assortment.
    gram : np.ndarray
        ``(d, d)`` ``YᵀY`` over the whole item table.
    num_items : int
        Rows of the item table (the catalog's).
    config : IALSConfig
        fedals' settings, to solve the users with.
    item_rows : int
        Rows of the table with a factor (the rows ``gram`` sums over): |I| of the user solves.
    """
    tensors = market.tensors
    trained = solve_users(market.train, items, gram, item_rows, config)
    folded = solve_users(market.with_valid, items, gram, item_rows, config)
    means = history_means(items, tensors.history, tensors.history_mask)
    head = HistoryHead.fit(trained, means)
    length = tensors.history.shape[1]
    valid = ials_recommender(items, num_items, head, head.offsets(trained, means), length)
    test_means = history_means(items, tensors.test_history, tensors.test_history_mask)
    test = ials_recommender(items, num_items, head, head.offsets(folded, test_means), length)
    return valid, test


def run_blend(
    source: MarketSource,
    catalog: Catalog,
    models_dir: Path,
    partner: str,
    config: IALSConfig,
    history_length: int,
    progress: Progress,
) -> dict[str, list[dict[str, float]]]:
    """Blend fedals' published factors with ``partner``'s served models in every market; their one-point curves.

    Parameters
    ----------
    source : MarketSource
        The run's markets.
    catalog : Catalog
        The run's catalog.
    models_dir : Path
        ``OUT/models``: ``fedals/published.pt`` and ``<partner>/<market>`` are read,
        ``blend/<market>`` written.
    partner : str
        The neural federated method that ran in this harness run.
    config : IALSConfig
        fedals' settings (``als-*``), to solve the users with.
    history_length : int
        Training items pooled into a user's history.
    progress : Progress
        Where to say each market's weight.

    Raises
    ------
    ValueError
        If the published file is not fedals' or another market's model is found for a market.
    """
    published = load_published(published_path(models_dir / ALS_METHOD))
    if published.method != ALS_METHOD:
        raise ValueError(
            f"{published.path} was published by {published.method}, not {ALS_METHOD}: blend needs "
            f"{ALS_METHOD}'s item factors."
        )
    table = published.arrays[ITEM_TABLE].numpy()
    # The Gram as fedals' server computes it and sends it to the markets (float64 sum, float32 wire).
    touched = table[table.any(axis=1)].astype(np.float64)
    gram = (touched.T @ touched).astype(np.float32).astype(np.float64)
    curves: dict[str, list[dict[str, float]]] = {}
    for name in source.markets:
        started = time.perf_counter()
        split = load_split(source, name, catalog)
        ratings = None
        if config.confidence != "binary":
            ratings = interaction_ratings(split, source.interactions(name), catalog)
        market = IALSMarket.from_split(split, history_length, ratings)
        served = load_served_model(models_dir / partner / name, catalog)
        if served.market != name or len(served.user_ids) != split.num_users:
            raise ValueError(f"{served.directory} is not the served model of market {name} of this run.")
        rows = split.market_items  # the rows fedals sends the market: its assortment
        items = ItemFactors(rows, table[rows].astype(np.float64))
        first_valid, first_test = ials_models(market, items, gram, catalog.size, config, len(touched))
        choice = choose_blend(first_valid, first_test, served.model, market.tensors)
        point = curve_point(choice.valid, choice.test, published.round)
        curves[name] = [point]
        metrics = {key: value for key, value in point.items() if key != "round"}
        manifest = {
            "method": BLEND,
            "market": name,
            "round": published.round,
            "metrics": metrics,
            "epsilon": None,
            "delta": None,
            "blend": {
                "of": [ALS_METHOD, partner],
                "weights": [choice.weight, 1.0 - choice.weight],
                "scales": list(choice.scales),
                f"{partner}-round": served.manifest.get("round"),
                "validation-ndcg@10": [[w, ndcg] for w, ndcg in choice.curve],
            },
        }
        write_served_model(
            models_dir / BLEND / name,
            choice.model,
            market.tensors,
            catalog,
            manifest,
            user_ids=market_user_ids(source.interactions(name)),
        )
        progress(
            f"blend {name}: w({ALS_METHOD}) {choice.weight:.1f}, val NDCG@10 {choice.valid.ndcg:.4f}, "
            f"test {choice.test.ndcg:.4f} ({time.perf_counter() - started:.1f} s)"
        )
    return curves
